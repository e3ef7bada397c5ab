"""The command line: bad data and bad flags give one clear line and exit code 2, before any model loads."""

import ast
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_script

import fine_tune

GOOD = '{"prompt": "Who is Mariya Sha?", "completion": "A wizard."}\n'

BAD_FILES = {
    "empty": (b"", ":", "no examples"),
    "blank lines only": (b"\n  \n", ":", "no examples"),
    "not utf-8": (
        GOOD.encode() + '{"prompt": "caf\u00e9", "completion": "x"}\n'.encode("latin-1"),
        ":2:",
        "UTF-8",
    ),
    "broken json on line 3": (
        (GOOD * 2 + '{"prompt": "x", "completion": }\n').encode(),
        ":3:",
        "invalid JSON",
    ),
    "not an object": (
        (GOOD + '["Who is Mariya Sha?", "A wizard."]\n').encode(),
        ":2:",
        "expected a JSON object",
    ),
    "missing key": (
        (GOOD + '{"prompt": "Who is Mariya Sha?"}\n').encode(),
        ":2:",
        'missing key "completion"',
    ),
    "empty value": ((GOOD + '{"prompt": "  ", "completion": "x"}\n').encode(), ":2:", '"prompt" is empty'),
    "wrong type": ((GOOD + '{"prompt": "x", "completion": 42}\n').encode(), ":2:", "must be a string"),
    "array with a bad item": (
        b'[{"prompt": "x", "completion": "y"}, {"prompt": "x"}]',
        "item 2",
        "missing key",
    ),
}


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if anything tries to find or load a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    for name in ("choose_model", "resolve_model", "load_base_model"):
        monkeypatch.setattr(fine_tune, name, refuse)


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_data_file_gives_one_line_naming_the_place_and_exit_code_2(case, tmp_path, capsys, no_model_loading):
    content, where, what = BAD_FILES[case]
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    assert fine_tune.main(["--data", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: {path}") and where in err and what in err
    assert not (tmp_path / "out").exists()


def test_missing_data_file(tmp_path, capsys, no_model_loading):
    assert fine_tune.main(["--data", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: file not found" in capsys.readouterr().err


def test_missing_replay_prompts_file_is_refused_before_a_model_loads(tmp_path, write_jsonl, capsys, no_model_loading):
    data = write_jsonl([json.loads(GOOD)])
    argv = ["--data", data, "--output", str(tmp_path / "out"), "--replay-prompts", str(tmp_path / "mine.txt")]
    assert fine_tune.main(argv) == 2
    assert "mine.txt: file not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_broken_line_from_the_command_line_has_no_traceback(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(GOOD + "{oops\n", encoding="utf-8")
    completed = run_script("--data", path, "--output", tmp_path / "out")
    assert completed.returncode == 2
    assert completed.stderr.strip() == f"error: {path}:2: invalid JSON " + (
        "(Expecting property name enclosed in double quotes); " + fine_tune.DATA_FIX
    )
    assert "Traceback" not in completed.stdout + completed.stderr


def test_a_json_array_of_pairs_is_accepted(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"prompt": "a", "completion": "b", "extra": 1}] * 2), encoding="utf-8")
    assert fine_tune.load_examples(path) == [{"prompt": "a", "completion": "b"}] * 2


def test_shipped_data_has_236_valid_pairs():
    assert len(fine_tune.load_examples(ROOT / "mariya.json")) == 236


def test_output_folder_with_other_files_is_not_overwritten(tmp_path, write_jsonl, capsys, no_model_loading):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.txt").write_text("years of work")
    assert fine_tune.main(["--data", write_jsonl([json.loads(GOOD)]), "--output", str(precious)]) == 2
    assert "--output" in capsys.readouterr().err
    assert (precious / "chapter1.txt").read_text() == "years of work"


def test_skip_training_without_an_adapter_says_what_to_do(tmp_path, capsys, no_model_loading):
    assert fine_tune.main(["--skip-training", "--output", str(tmp_path)]) == 2
    assert "no adapter in" in capsys.readouterr().err


def test_unreachable_hub_model_suggests_the_bundled_one(tmp_path, write_jsonl):
    completed = run_script(
        "--model",
        "nobody/no-such-model",
        "--data",
        write_jsonl([json.loads(GOOD)]),
        "--output",
        tmp_path / "o",
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    (line,) = completed.stderr.strip().splitlines()
    assert "nobody/no-such-model" in line and "--model smollm2" in line


def test_a_hub_out_of_reach_is_named_with_the_bundled_model_at_once(closed_hub, tmp_path, write_jsonl, capsys):
    """Online (HF_HUB_OFFLINE not set) with the Hub's port closed: one probe, not a minute of download retries,
    then one line that names the host it cannot reach and what works offline."""
    endpoint, connections = closed_hub
    data = write_jsonl([json.loads(GOOD)])
    argv = ["--model", "some-org/not-downloaded", "--data", data, "--output", str(tmp_path / "o")]
    assert fine_tune.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "error: --model some-org/not-downloaded: cannot reach 127.0.0.1 to download it; "
        "use --model smollm2 (bundled, works offline) or a local model folder"
    )
    assert connections == [("127.0.0.1", int(endpoint.rsplit(":", 1)[1]))], "the probe alone, no download tried"


def test_behind_a_proxy_the_hub_probe_leaves_the_verdict_to_huggingface_hub(closed_hub, monkeypatch):
    """The probe connects directly; where only a proxy reaches the Hub it would call a reachable Hub unreachable."""
    _, connections = closed_hub
    assert fine_tune.unreachable_hub() == "127.0.0.1"
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert fine_tune.unreachable_hub() is None
    assert len(connections) == 1, "no probe behind the proxy"


def test_missing_local_model_folder(tmp_path, write_jsonl, capsys):
    data = write_jsonl([json.loads(GOOD)])
    assert fine_tune.main(["--model", str(tmp_path / "nope"), "--data", data, "--output", str(tmp_path / "o")]) == 2
    assert "not a model folder" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--epochs", "--lr", "--batch-size", "--max-length", "--lora-r"])
def test_non_positive_numbers_are_refused(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fine_tune.parse_args([flag, "0"])
    assert exit_info.value.code == 2
    assert f"{flag} must be a positive number" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-0.1", "1"])
def test_lora_dropout_outside_zero_to_one_is_refused(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fine_tune.parse_args(["--lora-dropout", value])
    assert exit_info.value.code == 2
    assert "--lora-dropout must be at least 0 and below 1" in capsys.readouterr().err


def parser_flags():
    """Every --flag of the parser, in its order (--help's order)."""
    actions = fine_tune.build_parser()._actions
    return [flag for action in actions for flag in action.option_strings if flag.startswith("--") and flag != "--help"]


def test_help_lists_every_flag_without_importing_torch():
    code = (
        "import sys, contextlib, io; sys.argv = ['fine_tune.py', '--help']; import fine_tune\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try: fine_tune.main()\n"
        "    except SystemExit: pass\n"
        "heavy = ('torch', 'transformers', 'peft', 'datasets')\n"
        "print(sorted(m for m in heavy if m in sys.modules)); print(out.getvalue())"
    )
    completed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    first, help_text = completed.stdout.split("\n", 1)
    assert first == "[]", "--help answers without loading the heavy libraries"
    assert all(flag in help_text for flag in parser_flags())
    assert [title for title in fine_tune.FLAGS] == [
        "data",
        "model",
        "LoRA and training",
        "scorecard",
        "using the model",
    ]
    assert all(f"\n{title}:\n" in help_text for title in fine_tune.FLAGS), "flags grouped by purpose"


def readme_flag_table():
    """[(flags, default cell)] of the README's flag table, row by row."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("| flag | default | meaning |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split(" | ") for line in table.strip().splitlines()[1:]]
    return [(re.findall(r"--[a-z][a-z0-9-]*", cells[0]), cells[1]) for cells in rows]


# Defaults that are worked out when the script runs; the README says how.
DEFAULTS_IN_WORDS = {
    "--model": "with CUDA, else `smollm2`",
    "--eval-questions": "`eval_mariya.jsonl` with `mariya.json`",
}


def shown_as(default, cell):
    """Whether a README default cell shows the parser's default."""
    cell = cell.strip().strip("`")
    if default is None or default is False:
        return cell.startswith(("off", "none"))
    if default is True:
        return cell == "on"
    if isinstance(default, (int, float)):
        number, _, rest = cell.partition(" (")  # e.g. 2e-3 (5e-5 with `--full`)
        return float(number) == default and (not rest or float(rest.split()[0]) == fine_tune.FULL_LR)
    return default == cell or Path(default) in (fine_tune.HERE / cell, Path(cell).expanduser())


def settings_read(tree, function=None):
    """The names read as `args.NAME` in a module's source (only inside `function`, when given)."""
    if function:
        tree = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == function)
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args"
    }


def test_the_benchmarks_use_the_parsers_flags_and_settings():
    """bench_recall reads every setting from fine_tune.parse_args, as bench_train's default run does, and
    bench_train's default-* recipes are flags: a renamed flag fails here, not an hour into a benchmark."""
    settings = set(vars(fine_tune.parse_args([])))
    recall = ast.parse((ROOT / "benchmarks" / "bench_recall.py").read_text(encoding="utf-8"))
    train = ast.parse((ROOT / "benchmarks" / "bench_train.py").read_text(encoding="utf-8"))
    assert settings_read(recall) <= settings, settings_read(recall) - settings
    assert settings_read(train, "train_default") <= settings, settings_read(train, "train_default") - settings
    recipes = next(
        ast.literal_eval(node.value)
        for node in train.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "DEFAULT_FLAGS"
    )
    for recipe, flags in recipes.items():
        assert {flag for flag in flags if flag.startswith("--")} <= set(parser_flags()), recipe
        fine_tune.parse_args(list(flags))  # and their values are accepted (a bad one exits)


def test_the_readme_flag_table_lists_every_flag_in_order_with_its_default():
    table = readme_flag_table()
    assert [flag for flags, _ in table for flag in flags] == parser_flags(), "the same flags, in --help's order"
    defaults = {action.option_strings[0]: action.default for action in fine_tune.build_parser()._actions}
    defaults["--lr"] = fine_tune.parse_args([]).lr  # chosen after parsing: LoRA's, or --full's
    for flags, cell in table:
        flags = [flag for flag in flags if not flag.startswith("--no-")]
        cells = cell.split(" / ") if " / " in cell else [cell] * len(flags)  # one cell can serve a whole row
        assert len(cells) == len(flags), f"one default for each of {flags}: {cell!r}"
        for flag, shown in zip(flags, cells):
            if flag in DEFAULTS_IN_WORDS:
                assert DEFAULTS_IN_WORDS[flag] in shown, flag
            else:
                assert shown_as(defaults[flag], shown), (
                    f"README shows {shown!r} for {flag}, the parser {defaults[flag]!r}"
                )


def test_each_setting_has_one_name_and_one_default_from_the_flag_to_every_function():
    """A function's parameter named after a setting defaults to the flag's default; no function takes a setting
    under another name (learning_rate for --lr); default_settings knows the flags' names only."""
    defaults = vars(fine_tune.parse_args([]))
    # --eval-questions names a file and --precision asks (auto); functions take the questions read and the precision
    # chosen (see choose_precision)
    for resolved in ("eval_questions", "precision"):
        del defaults[resolved]
    functions = [value for value in vars(fine_tune).values() if inspect.isfunction(value)]
    parameters = [(f.__name__, p) for f in functions for p in inspect.signature(f).parameters.values()]
    for function, parameter in parameters:
        if parameter.name in defaults and parameter.default is not inspect.Parameter.empty:
            same = str(parameter.default) == str(defaults[parameter.name])  # a folder's default may be a Path
            assert same, (
                f"{function}({parameter.name}={parameter.default!r}), the flag's default {defaults[parameter.name]!r}"
            )
    other_names = {"learning_rate", "neftune_alpha", "neftune_noise_alpha", "activation_checkpointing", "num_epochs"}
    assert not other_names & {parameter.name for _, parameter in parameters}
    assert fine_tune.default_settings(epochs=1).epochs == 1 and fine_tune.default_settings().lr == fine_tune.LR
    assert fine_tune.default_settings(full=True).lr == fine_tune.FULL_LR
    with pytest.raises(TypeError, match="no such setting: learning_rate"):
        fine_tune.default_settings(learning_rate=1e-3)
