"""--precision: bf16 where the hardware computes it natively, float32 where bf16 would be emulated; said and used."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import fine_tune


@pytest.fixture
def cpu(monkeypatch):
    """A CPU-only machine whose bf16 instructions the test chooses: cpu(avx512_bf16=..., amx=...)."""

    def machine(avx512_bf16=False, amx=False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        for variable in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
            monkeypatch.delenv(variable, raising=False)

    return machine


@pytest.fixture
def gpu(monkeypatch):
    def machine(bf16):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Tesla T4" if not bf16 else "NVIDIA H200")

    return machine


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "cap", "expected", "reason"),
    [
        (True, False, None, "bf16", "this CPU has AVX-512 BF16"),
        (False, True, None, "bf16", "this CPU has AMX"),
        (False, False, None, "fp32", "no native bf16 instructions"),
        (True, False, "AVX2", "fp32", "ONEDNN_MAX_CPU_ISA=AVX2 keeps the matrix kernels"),
        (True, False, "avx512_core", "fp32", "ONEDNN_MAX_CPU_ISA=AVX512_CORE keeps"),
        (True, True, "AVX512_CORE_AMX", "bf16", "this CPU has AMX"),
    ],
)
def test_auto_picks_bf16_only_where_the_cpu_kernels_compute_it_natively(
    cpu, monkeypatch, avx512_bf16, amx, cap, expected, reason
):
    cpu(avx512_bf16, amx)
    if cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    precision, why = fine_tune.choose_precision("auto")
    assert precision == expected and reason in why


def test_bf16_forced_on_a_cpu_without_it_runs_but_says_it_is_slow(cpu):
    cpu(avx512_bf16=False)
    precision, why = fine_tune.choose_precision("bf16")
    assert precision == "bf16" and "many times slower" in why
    assert fine_tune.choose_precision("fp32") == ("fp32", "chosen with --precision")


def test_fp16_is_refused_on_a_cpu(cpu):
    cpu(avx512_bf16=True)
    with pytest.raises(fine_tune.UsageError, match="--precision fp16 needs a CUDA GPU"):
        fine_tune.choose_precision("fp16")


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16"), (False, "fp16")])
def test_auto_on_a_gpu_uses_its_native_half_precision(gpu, bf16, expected):
    gpu(bf16)
    precision, why = fine_tune.choose_precision("auto")
    assert precision == expected and f"computes {expected} natively" in why


def test_bf16_is_refused_on_a_gpu_without_it(gpu):
    gpu(bf16=False)
    with pytest.raises(fine_tune.UsageError, match="this GPU has no bf16 support"):
        fine_tune.choose_precision("bf16")


@pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="needs a CPU with AVX-512 BF16")
@pytest.mark.parametrize("cap", [None, "AVX512_CORE", "AVX2"])
def test_the_choice_follows_the_instructions_onednn_reports_it_uses(cap):
    """oneDNN's own report of the instructions it multiplies bf16 with agrees with the detection."""
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    env.update({"ONEDNN_MAX_CPU_ISA": cap} if cap else {})
    code = (
        "import torch, fine_tune\n"
        "with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):\n"
        "    torch.nn.Linear(64, 64).bfloat16()(torch.ones(16, 64, dtype=torch.bfloat16))\n"
        "print('CHOSEN', fine_tune.choose_precision('auto')[0])\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert completed.returncode == 0, completed.stderr[-2000:]
    # oneDNN names its instruction set when it runs the product; capped at AVX2 it does not run it at all.
    isa = [line for line in completed.stdout.splitlines() if ",isa:" in line]
    chosen = completed.stdout.split("CHOSEN ")[1].strip()
    assert any("bfloat16" in line for line in isa) == (chosen == "bf16"), isa


def down_proj_output_dtypes(model, run):
    """The dtype of every output of the first layer's down_proj while `run()` runs."""
    dtypes = []
    layer = next(module for name, module in model.named_modules() if name.endswith("layers.0.mlp.down_proj"))
    handle = layer.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    try:
        run()
    finally:
        handle.remove()
    return set(dtypes)


@pytest.mark.parametrize(("precision", "computes_in"), [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_questions_and_training_compute_in_the_chosen_precision_with_float32_weights(
    tiny_model_dir, tmp_path, precision, computes_in
):
    model, tokenizer = fine_tune.load_base_model(tiny_model_dir, precision=precision)
    asked = down_proj_output_dtypes(model, lambda: fine_tune.generate_answers(model, tokenizer, ["Q?"], 2))
    assert asked == {computes_in}
    dataset = fine_tune.load_and_preprocess_data([{"prompt": "Q?", "completion": "A."}] * 8, tokenizer)
    settings = fine_tune.default_settings(output=str(tmp_path / "out"), epochs=1)
    model = fine_tune.setup_lora_model(model, settings)
    trained = down_proj_output_dtypes(model, lambda: fine_tune.train_model(model, tokenizer, dataset, settings))
    assert trained == {computes_in}
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}, "weights stay float32"


def test_the_questions_after_training_and_the_chat_compute_in_the_chosen_precision(
    tiny_model_dir, tmp_path, write_jsonl, monkeypatch
):
    """Step 6 and --chat load the adapter again from disk (--skip-training --chat too): in bf16 as asked, like
    training, not in float32."""
    seen = []

    def observed(phase, function):
        def spy(model, tokenizer, *args, **kwargs):
            result = []
            dtypes = down_proj_output_dtypes(model, lambda: result.append(function(model, tokenizer, *args, **kwargs)))
            seen.append((phase, dtypes))
            return result[0]

        return spy

    monkeypatch.setattr(fine_tune, "test_finetuned_model", observed("after", fine_tune.test_finetuned_model))
    monkeypatch.setattr(fine_tune, "chat", observed("chat", fine_tune.chat))
    data = write_jsonl([{"prompt": "Who is Mariya Sha?", "completion": "A wizard."}] * 4)
    eval_file = write_jsonl([{"kind": "knowledge", "question": "Who is she?", "expect": ["wizard"]}], "eval.jsonl")
    output = str(tmp_path / "out")
    args = ["--model", tiny_model_dir, "--data", data, "--output", output, "--eval-questions", eval_file]
    args += ["--no-replay", "--skip-original", "--epochs", "1", "--max-new-tokens", "4", "--precision", "bf16"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Who is Mariya Sha?\n"))
    assert fine_tune.main([*args, "--chat"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("Who is Mariya Sha?\n"))
    assert fine_tune.main(["--output", output, "--skip-training", "--chat", "--precision", "bf16"]) == 0
    assert seen == [("after", {torch.bfloat16}), ("chat", {torch.bfloat16}), ("chat", {torch.bfloat16})]


def test_a_float32_base_trained_in_bf16_merges_and_exports_in_float32(exportable_model, tmp_path, write_jsonl):
    data = write_jsonl([{"prompt": "Who is Mariya Sha?", "completion": "A wizard."}] * 8)
    output = tmp_path / "out"
    args = ["--model", exportable_model("llama"), "--data", data, "--output", str(output), "--eval-questions", "none"]
    args += ["--no-replay", "--skip-original", "--epochs", "1", "--precision", "bf16"]
    args += ["--merge", "--export-gguf", "f32"]
    assert fine_tune.main(args) == 0
    assert json.loads((output / "merged" / "config.json").read_text())["dtype"] == "float32"
    import gguf

    reader = gguf.GGUFReader(output / "out-f32.gguf")
    assert {tensor.tensor_type for tensor in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    report = json.loads((output / "report.json").read_text())
    assert report["precision"]["used"] == "bf16" and report["settings"]["precision"] == "bf16"


def test_the_run_says_which_precision_and_why(tiny_model_dir, tmp_path, write_jsonl):
    """Limiting the kernels to AVX2, as a CPU without bf16 would, turns auto to float32, and the run says so."""
    data = write_jsonl([{"prompt": "Who is Mariya Sha?", "completion": "A wizard."}] * 4)
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    command = [sys.executable, str(ROOT / "fine_tune.py"), "--model", tiny_model_dir, "--data", data, "--output"]
    command += [str(tmp_path / "out"), "--eval-questions", "none", "--no-replay", "--epochs", "1"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    assert completed.returncode == 0, completed.stderr[-2000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("Precision:"))
    if torch.cpu._is_avx512_bf16_supported():
        assert line.startswith("Precision: float32 (ONEDNN_MAX_CPU_ISA=AVX2 keeps the matrix kernels")
    else:
        assert line.startswith("Precision: float32 (this CPU has no native bf16 instructions")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["precision"]["used"] == "fp32" and "AVX" in report["precision"]["why"]
