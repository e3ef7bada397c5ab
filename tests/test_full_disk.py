"""A full disk, for real (a small tmpfs, see small_disk): every write the script makes ends in one line and leaves
nothing half-written, what was there before still loads; a run whose outputs cannot fit is refused before the
work; what a killed run left is removed by the next run in the same folder."""

import errno
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, fill, make_adapter, make_tokenizer
from safetensors.torch import save_file

import fine_tune


def contents(folder):
    """Every file under folder with its bytes, but empty lock files: what a failed write must leave as it was."""
    files = [path for path in Path(folder).rglob("*") if path.is_file() and path.suffix != ".lock"]
    return {str(path.relative_to(folder)): path.read_bytes() for path in files}


def leftovers(folder):
    return sorted(path.name for path in fine_tune.leftovers(folder))


SIZE = r"\d+(\.\d)? (bytes|kB|MB|GB)"  # as size_text writes it


def disk_full_line(what, folder, flag="--output"):
    return (
        rf"could not write {re.escape(what)} in {re.escape(str(folder))}: the disk is full \((more than )?(?P<needs>"
        rf"{SIZE}) needed, 0 bytes free\); nothing half-written is left, an earlier one is unchanged\. Free some "
        rf"space or choose another {flag}"
    )


def tiny_args(model_dir, data, output, cache, *extra):
    """A short run of the tiny model, its cache (the base model's answers) in `cache`, off the small disk."""
    return [str(arg) for arg in ("--model", model_dir, "--data", data, "--output", output, "--cache-dir", cache,
            "--no-replay", "--eval-questions", "none", "--skip-original", "--epochs", "1", *extra)]  # fmt: skip


# How each library says that the disk is full, as seen on a full tmpfs: safetensors and tokenizers (Rust) raise
# errors of their own types, torch.save a RuntimeError that does not say it.
WRITERS = {
    "safetensors": lambda folder: save_file({"weight": torch.zeros(1 << 16)}, folder / "model.safetensors"),
    "tokenizers": lambda folder: make_tokenizer().backend_tokenizer.save(str(folder / "tokenizer.json")),
    "torch.save": lambda folder: torch.save({"weight": torch.zeros(1 << 16)}, folder / "optimizer.pt"),
    "open": lambda folder: (folder / "report.json").write_text("{}" * (1 << 16)),
}


@pytest.mark.parametrize("library", WRITERS)
def test_each_library_s_error_on_a_full_disk_is_recognised(library, small_disk):
    fill(small_disk)
    with pytest.raises(Exception) as raised:
        WRITERS[library](small_disk)
    assert fine_tune.disk_full(raised.value, small_disk)


def test_a_full_quota_counts_as_a_full_disk_but_not_other_errors_nor_ctrl_c(small_disk):
    assert fine_tune.disk_full(OSError(errno.EDQUOT, "Kontingent überschritten"), small_disk), "by its code"
    assert not fine_tune.disk_full(RuntimeError("unexpected pos 576 vs 534"), small_disk), "the disk has room"
    fill(small_disk)
    assert not fine_tune.disk_full(KeyboardInterrupt(), small_disk)


def save_adapter(model_dir, folder):
    model, tokenizer = make_adapter(model_dir, folder)
    return lambda: fine_tune.save_model(model, tokenizer, folder)


def merge(model_dir, folder):
    make_adapter(model_dir, folder)
    fine_tune.merge_adapter(folder, model_dir, folder / "merged")
    return lambda: fine_tune.merge_adapter(folder, model_dir, folder / "merged")


def train_with_checkpoints(model_dir, folder):
    model, tokenizer = make_adapter(model_dir, folder)  # the adapter of an earlier run
    model, tokenizer = fine_tune.load_base_model(model_dir)
    examples = fine_tune.load_examples(ROOT / "mariya.json")[:8]
    dataset = fine_tune.load_and_preprocess_data(examples, tokenizer, bare_share=0)
    settings = fine_tune.default_settings(output=str(folder), epochs=1, save_steps=1)
    model = fine_tune.setup_lora_model(model, settings)
    return lambda: fine_tune.train_model(model, tokenizer, dataset, settings)


def export(model_dir, folder):
    fine_tune.export_gguf(model_dir, folder / "tiny.gguf", "q8_0")
    return lambda: fine_tune.export_gguf(model_dir, folder / "tiny.gguf", "f16")


def modelfile(model_dir, folder):
    fine_tune.write_modelfile(folder / "tiny.gguf", model_dir)
    return lambda: fine_tune.write_modelfile(folder / "tiny.gguf", model_dir, "You are a wizard. " * 1000)


def report(model_dir, folder):
    fine_tune.write_report({"the": "earlier run"}, folder)
    return lambda: fine_tune.write_report({"this": "run"}, folder)


def loss_plot(model_dir, folder):
    fine_tune.plot_loss([{"step": 1, "loss": 3.0}], folder / "loss.png")
    return lambda: fine_tune.plot_loss([{"step": step, "loss": 3 / step} for step in range(1, 9)], folder / "loss.png")


def answers(model_dir, folder):
    fine_tune.remembered(folder, ["earlier question"], lambda: {"question": "an answer"})
    return lambda: fine_tune.remembered(folder, ["new question"], lambda: {"question": "another answer"})


def conversion(model_dir, folder):
    gguf = fine_tune.export_gguf(model_dir, folder.parent.parent / "tiny.gguf", "f32")  # not on the small disk
    return lambda: fine_tune.resolve_model(gguf, folder)


# Each write the script makes: what it writes, how a test writes it once (what was there before) and returns how
# it writes it again, the option choosing where. Checkpoints are Trainer's writes, in place.
WRITES = {
    "the adapter": (save_adapter, "--output"),
    "checkpoint-1": (train_with_checkpoints, "--output"),
    "the merged model": (merge, "--output"),
    "the GGUF file": (export, "--output"),
    "the Modelfile": (modelfile, "--output"),
    "report.json": (report, "--output"),
    "loss.png": (loss_plot, "--output"),
    "the base model's answers": (answers, "--cache-dir"),
    "the converted model": (conversion, "--cache-dir"),
}


@pytest.mark.parametrize("what", WRITES)
def test_a_full_disk_at_each_write_ends_in_one_line_and_changes_nothing(
    what, tiny_model_dir, exportable_model, small_disk
):
    folder = small_disk / "out"
    folder.mkdir()
    prepare, flag = WRITES[what]
    # GGUF files are written by llama.cpp's converter, which takes a model whose tokenizer it knows
    write_again = prepare(
        exportable_model("llama") if "GGUF" in what or "converted" in what else tiny_model_dir, folder
    )
    before = contents(folder)
    fill(small_disk)
    with pytest.raises(fine_tune.RunFailed) as failed:
        write_again()
    line = re.fullmatch(disk_full_line(what, folder, flag), str(failed.value))
    assert line and line["needs"] != "0 bytes"
    assert contents(folder) == before, "nothing half-written, nothing that was there changed"
    if what in ("the adapter", "checkpoint-1"):
        fine_tune.load_finetuned_model(folder)


@pytest.mark.parametrize(
    "flags, where, what",
    [
        ((), "peft.PeftModel.save_pretrained", "the adapter"),  # as training ends
        (("--skip-training", "--merge"), "fine_tune.merge_adapter", "the merged model"),
        (("--skip-training", "--export-gguf", "q8_0"), "fine_tune.export_gguf", "the GGUF file"),  # after its merge
    ],
    ids=["training", "merge", "export-gguf"],
)
def test_a_disk_that_fills_during_a_run_ends_it_with_one_line_and_keeps_the_adapter(
    flags, where, what, tiny_model_dir, exportable_model, subset, small_disk, tmp_path, monkeypatch, capsys
):
    output = small_disk / "out"
    tiny_model_dir = exportable_model("llama3.2") if "--export-gguf" in flags else tiny_model_dir  # merged: 16 MB
    make_adapter(tiny_model_dir, output)
    before = contents(output)
    write = pkgutil.resolve_name(where)
    monkeypatch.setattr(where, lambda *args, **kwargs: fill(small_disk) or write(*args, **kwargs))
    code = fine_tune.main(tiny_args(tiny_model_dir, subset, output, tmp_path, *flags))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert re.fullmatch("error: " + disk_full_line(what, output), err.strip().splitlines()[-1])
    assert not leftovers(output)
    assert {name: data for name, data in contents(output).items() if name in before} == before
    fine_tune.load_finetuned_model(output)


@pytest.mark.parametrize(
    "flags, needs",
    [
        ((), f"the adapter {SIZE}"),
        (("--save-steps", "5"), f"the adapter and a checkpoint {SIZE}"),
        (("--skip-training", "--merge"), f"the merged model {SIZE}"),
        (("--skip-training", "--export-gguf", "f32"), f"the merged model {SIZE}, the f32 GGUF file {SIZE}"),
    ],
    ids=["training", "checkpoints", "merge", "export-gguf"],
)
def test_a_run_whose_outputs_cannot_fit_is_refused_before_the_work(
    flags, needs, tiny_model_dir, exportable_model, subset, small_disk, tmp_path, capsys
):
    output = small_disk / "out"
    tiny_model_dir = exportable_model("llama") if "--export-gguf" in flags else tiny_model_dir
    make_adapter(tiny_model_dir, output)
    before = contents(output)
    fill(small_disk)
    capsys.readouterr()  # make_adapter's loading bars
    code = fine_tune.main(tiny_args(tiny_model_dir, subset, output, tmp_path, *flags))
    out, err = capsys.readouterr()
    assert code == 2
    assert re.fullmatch(
        rf"error: --output {output}: its disk has 0 bytes free, and this run writes about {SIZE} \({needs}\); "
        r"free some space or choose another --output\n",
        err,
    )
    assert "Loading" not in out, "refused before the model loads"
    assert contents(output) == before


def test_the_space_estimates_are_at_most_what_is_written(exportable_model, tmp_path):
    for model_dir in (exportable_model("llama3.2"), exportable_model("llama")):  # tied and untied output layers
        output = tmp_path / Path(model_dir).name
        make_adapter(model_dir, output)
        written = {"adapter": fine_tune.path_size(output)}
        merged = fine_tune.merge_adapter(output, model_dir, output / "merged")
        written["merged"] = fine_tune.path_size(merged)
        estimate = fine_tune.output_sizes(model_dir)
        for qtype in fine_tune.GGUF_TYPES:
            written[qtype] = Path(fine_tune.export_gguf(merged, output / f"{qtype}.gguf", qtype)).stat().st_size
            estimate[qtype] = estimate["weights"] * fine_tune.GGUF_BYTES_PER_WEIGHT[qtype]
        # Low, so that only what clearly cannot fit is refused; but close (metadata is a larger share in a tiny model)
        for name, size in written.items():
            assert 0.6 * size <= estimate[name] <= size, (model_dir, name, estimate[name], size)


def test_a_run_removes_what_a_run_killed_while_saving_left_in_its_output(tiny_model_dir, subset, tmp_path):
    output = tmp_path / "out"
    (output / ".adapter.partial").mkdir(parents=True)
    (output / ".adapter.partial" / "adapter_model.safetensors").write_bytes(b"half a file")
    (output / ".loss.png.partial").write_bytes(b"half a file")
    (output / ".merge-k2j4h1x0").mkdir()  # the scratch folder of --export-gguf's merge
    (output / "report.json.partial").write_text("{")  # as version 7420ab0 named it
    assert fine_tune.main(tiny_args(tiny_model_dir, subset, output, tmp_path)) == 0, "not refused: it holds leftovers"
    assert leftovers(output) == []
    assert (output / "adapter_config.json").is_file()


def test_the_space_a_killed_run_s_leftovers_hold_counts_as_free(tiny_model_dir, subset, small_disk, tmp_path):
    output = small_disk / "out"
    make_adapter(tiny_model_dir, output)
    (output / ".merged.partial").mkdir()
    fill(output / ".merged.partial")  # a killed merge's half model takes all the space left
    assert fine_tune.main(tiny_args(tiny_model_dir, subset, output, tmp_path, "--skip-training", "--merge")) == 0
    assert leftovers(output) == [] and (output / "merged" / "config.json").is_file()


# A run of --merge --export-gguf that stops once the merged model is written, before it is renamed into place.
PAUSED_MERGE = """import sys, time, transformers, fine_tune
save = transformers.PreTrainedModel.save_pretrained
def save_and_wait(self, folder, *args, **kwargs):
    save(self, folder, *args, **kwargs)
    print("saved", flush=True)
    time.sleep(600)
transformers.PreTrainedModel.save_pretrained = save_and_wait
sys.exit(fine_tune.main(sys.argv[1:]))
"""


def test_a_merge_killed_midway_leaves_the_old_one_and_the_next_run_cleans_up(exportable_model, tmp_path, capsys):
    tiny_model_dir = exportable_model("llama")  # one that llama.cpp's converter takes: the run exports it too
    output = tmp_path / "out"
    make_adapter(tiny_model_dir, output)
    fine_tune.merge_adapter(output, tiny_model_dir, output / "merged")  # an earlier merge
    earlier = contents(output / "merged")
    args = tiny_args(tiny_model_dir, ROOT / "mariya.json", output, tmp_path, "--skip-training", "--merge")
    killed = subprocess.Popen(
        [sys.executable, "-c", PAUSED_MERGE, *args, "--export-gguf"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        while killed.stdout.readline() != "saved\n":
            assert killed.poll() is None, "the run ended before it merged"
        left = leftovers(output)
        assert ".merged.partial" in left and any(name.startswith(".merge-") for name in left), left
        assert fine_tune.main(args) == 2, "the live run holds --output"
        assert leftovers(output) == left, "and what it is writing is left alone"
    finally:
        killed.kill()  # as kill -9
        killed.wait()
    assert contents(output / "merged") == earlier, "the earlier merge is whole"
    capsys.readouterr()
    assert fine_tune.main(args) == 0
    assert leftovers(output) == []
    assert fine_tune.load_base_model(output / "merged")
