"""--compile: the decoder layers compiled for training where it pays and can run; never a crashed run."""

import json

import pytest
import torch
from safetensors.torch import load_file

import fine_tune


def train_args(model_dir, data, output, *extra):
    return [str(arg) for arg in ["--model", model_dir, "--data", data, "--output", output, "--eval-questions",
            "none", "--skip-original", "--epochs", "1", *extra]]  # fmt: skip


@pytest.fixture
def fresh_dynamo():
    """Compiled code is kept per function for the whole process: each test starts and ends without any."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "requested, rows, compiles, why",
    [
        ("off", 10**6, False, "chosen with --compile"),
        ("auto", 200, False, "a short run (200 rows)"),
        ("auto", 1509, True, "1509 rows to train"),
        ("on", 200, True, "chosen with --compile"),
    ],
)
def test_auto_compiles_a_run_long_enough_to_repay_the_compile_time(requested, rows, compiles, why):
    chosen, reason = fine_tune.choose_compile(requested, "cpu", rows)
    assert chosen is compiles and why in reason


def test_deepspeed_and_fsdp_train_uncompiled_as_they_wrap_the_layers_themselves(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert fine_tune.choose_compile("on", "cpu", 10**6) == (False, "DeepSpeed and FSDP wrap the layers themselves")


def test_without_a_cpp_compiler_the_run_trains_uncompiled_and_says_why(
    tiny_llama_dir, subset, tmp_path, capsys, fresh_dynamo
):
    with torch._inductor.config.patch({"cpp.cxx": (None, "no-such-c++-compiler")}):
        assert fine_tune.choose_compile("auto", "cpu", 10**6)[0] is False
        assert fine_tune.main(train_args(tiny_llama_dir, subset, tmp_path / "out", "--compile", "on")) == 0
    out = capsys.readouterr().out
    assert "Compile: off (no C++ compiler found" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["compile"]["used"] is False


def test_a_compiler_error_means_uncompiled_training_and_one_line_not_a_crash(
    monkeypatch, tiny_llama_dir, subset, tmp_path, capsys, fresh_dynamo
):
    def broken_compiler(*args, **kwargs):
        raise RuntimeError("internal compiler error: the backend broke\nwith a long trace after it")

    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", broken_compiler)
    assert fine_tune.main(train_args(tiny_llama_dir, subset, tmp_path / "out", "--compile", "on")) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("Compile: failed")]
    assert len(lines) == 1, out
    assert "the backend broke" in lines[0] and "uncompiled" in lines[0]
    assert "long trace" not in lines[0]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["compile"] == {"used": False, "why": "compiling failed"}
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_a_compiled_run_trains_the_adapter_an_uncompiled_run_trains(tiny_llama_dir, subset, tmp_path, fresh_dynamo):
    """Same data, seed and steps (the base model's answers and the KL term included): the compiled layers compute
    what the uncompiled ones do, within bf16's rounding, so the two adapters change the model alike."""
    reports = {}
    for mode in ("off", "on"):
        output = tmp_path / mode
        assert fine_tune.main(train_args(tiny_llama_dir, subset, output, "--compile", mode, "--epochs", "2")) == 0
        reports[mode] = json.loads((output / "report.json").read_text())
        assert reports[mode]["compile"]["used"] is (mode == "on")
    assert reports["on"]["training"]["final_train_loss"] == pytest.approx(
        reports["off"]["training"]["final_train_loss"], rel=1e-3
    )
    eager, compiled = (load_file(tmp_path / mode / "adapter_model.safetensors") for mode in ("off", "on"))
    for name in eager:  # Adam's steps on the smallest gradients differ most: compared as whole tensors
        assert (compiled[name] - eager[name]).norm() <= 0.15 * eager[name].norm(), name

    base, tokenizer = fine_tune.load_base_model(tiny_llama_dir)
    prompts = [fine_tune.prompt_ids(tokenizer, q) for q in ("Who is Mariya Sha?", "What is the capital of France?")]
    batch = tokenizer.pad([{"input_ids": ids} for ids in prompts], return_tensors="pt")
    with torch.no_grad():
        before = base(**batch).logits
        eager_logits, compiled_logits = (
            fine_tune.load_finetuned_model(tmp_path / mode, tiny_llama_dir)[0](**batch).logits for mode in ("off", "on")
        )
    learned = (eager_logits - before).norm()
    assert learned > 0
    assert (compiled_logits - eager_logits).norm() <= 0.1 * learned
