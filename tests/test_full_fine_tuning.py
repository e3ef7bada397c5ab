"""--full: every weight learns; the whole model is saved, reloaded, resumed, exported; what cannot work is refused."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ask_llama_cpp
from safetensors.torch import load_file

import fine_tune

PAIRS = [{"prompt": "Who is Mariya Sha?", "completion": "Mariya Sha is a wizard of Middle-earth."}] * 4


def full_args(model_dir, data, output, *extra, full=True):
    return [
        "--model", str(model_dir), "--data", data, "--output", str(output), "--eval-questions", "none",
        "--no-replay", "--skip-original", *(["--full", "--lr", "1e-3"] if full else []), *extra,
    ]  # fmt: skip


@pytest.mark.slow  # trains, exports to GGUF, asks llama.cpp and a fresh process: 13 s on 2 cores
def test_full_fine_tuning_changes_every_weight_and_saves_a_model_that_answers_in_a_fresh_process(
    exportable_model, tmp_path, write_jsonl
):
    model_dir, output = Path(exportable_model("llama")), tmp_path / "out"
    args = full_args(model_dir, write_jsonl(PAIRS), output, "--epochs", "2", "--export-gguf", "q8_0")
    assert fine_tune.main(args) == 0

    assert fine_tune.trained_kind(output) == "full" and not (output / "adapter_config.json").exists()
    assert fine_tune.trained_base_model(output) == str(model_dir)
    base, trained = load_file(model_dir / "model.safetensors"), load_file(output / "model.safetensors")
    assert base.keys() == trained.keys()
    unchanged = [name for name in base if torch.equal(base[name], trained[name])]
    assert not unchanged, f"--full trains every weight, these did not change: {unchanged}"
    report = json.loads((output / "report.json").read_text())
    assert report["settings"]["full"] and report["settings"]["lr"] == 1e-3

    # A plain transformers user loads it, without peft or this script, in a new process.
    code = (
        "import sys, transformers as t; m = t.AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
        "k = t.AutoTokenizer.from_pretrained(sys.argv[1]); "
        "print(len(m.generate(**k('Who is', return_tensors='pt'), max_new_tokens=3, do_sample=False)[0]))"
    )
    fresh = subprocess.run([sys.executable, "-c", code, output], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0 and int(fresh.stdout.split()[-1]) > 2, fresh.stderr[-2000:]
    # The GGUF is made from the model itself (no merge): llama.cpp answers.
    gguf = output / "out-q8_0.gguf"
    assert ask_llama_cpp(gguf, "Who is Mariya Sha?", max_tokens=4)["answer"].strip()
    assert not list(output.glob(".merge-*")) and not (output / "merged").exists()

    # Asked again later, the model in --output answers as it is, with the base model it came from.
    assert fine_tune.main(["--output", str(output), "--skip-training", "--eval-questions", "none"]) == 0


def test_full_fine_tuning_distills_against_the_weights_it_started_from(tiny_model_dir, tmp_path, monkeypatch):
    seen, real = [], fine_tune.base_divergence

    def recording(model, inputs, logits, rows, base_weights=None):
        divergence = real(model, inputs, logits, rows, base_weights)
        seen.append(divergence.item())
        return divergence

    monkeypatch.setattr(fine_tune, "base_divergence", recording)
    model, tokenizer = fine_tune.load_base_model(tiny_model_dir)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    replay = [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "from_base": True} for i in range(4)]
    dataset = fine_tune.load_and_preprocess_data(PAIRS + replay, tokenizer, bare_share=0)
    settings = fine_tune.default_settings(full=True, lr=1e-3, output=str(tmp_path), epochs=3, batch_size=len(dataset))
    model = fine_tune.setup_lora_model(model, settings)
    trainer = fine_tune.train_model(model, tokenizer, dataset, settings)

    assert type(trainer).__name__ == "DistillingTrainer" and len(seen) == 3
    assert seen[0] == pytest.approx(0, abs=1e-6), "before the first step the model is its base"
    assert seen[-1] > 1e-4, "later steps compare with the weights it started from, not with themselves"
    assert any(not torch.equal(start[name], p) for name, p in model.named_parameters())


@pytest.mark.slow  # three trainings
def test_a_killed_full_run_resumes_to_the_model_of_an_uninterrupted_run(tiny_model_dir, tmp_path, write_jsonl):
    """The base weights that the KL term compares with are the base model's, not the checkpoint's."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\nHow many legs does a spider have?\n", encoding="utf-8")
    data = write_jsonl(PAIRS * 2)
    replay = ["--replay", "--replay-prompts", str(prompts), "--epochs", "2", "--batch-size", "2", "--seed", "3"]
    whole = tmp_path / "whole"
    args = full_args(tiny_model_dir, data, whole, *replay, "--save-steps", "3", "--keep-checkpoints")
    assert fine_tune.main(args) == 0
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(whole / "checkpoint-3", killed / "checkpoint-3")  # what a run killed after step 3 leaves

    lora = full_args(tiny_model_dir, data, killed, *replay, "--resume", full=False)
    assert fine_tune.main(lora) == 2, "a --full checkpoint does not continue as LoRA"
    assert fine_tune.main([*full_args(tiny_model_dir, data, killed, *replay), "--resume"]) == 0
    expected, got = load_file(whole / "model.safetensors"), load_file(killed / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] - got[name]).abs().max() < 1e-5, name


def test_what_full_fine_tuning_cannot_do_is_refused_before_training(
    tiny_model_dir, tmp_path, write_jsonl, capsys, monkeypatch
):
    output, data = tmp_path / "out", write_jsonl(PAIRS)
    with monkeypatch.context() as zero3:
        zero3.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")  # as accelerate launch sets it for each process
        zero3.setenv("WORLD_SIZE", "2")
        assert fine_tune.main(full_args(tiny_model_dir, data, output, "--replay")) == 2
        assert "--full under DeepSpeed ZeRO-3 or FSDP: --kl-weight needs" in capsys.readouterr().err
    assert fine_tune.main(full_args(tiny_model_dir, data, output, "--merge")) == 2
    assert "--merge: after --full" in capsys.readouterr().err and not output.exists()
    assert fine_tune.main(full_args(tiny_model_dir, data, output, "--load-in-4bit")) == 2
    assert "--full trains every weight, which 4-bit weights cannot" in capsys.readouterr().err
    assert fine_tune.main(full_args(tiny_model_dir, data, output, "--lora-plus", "16")) == 2
    assert "--lora-plus sets the learning rate of LoRA's B matrices" in capsys.readouterr().err

    assert fine_tune.main(full_args(tiny_model_dir, data, output, "--epochs", "1")) == 0
    capsys.readouterr()
    assert fine_tune.main(["--output", str(output), "--skip-training", "--merge"]) == 2
    assert "holds the whole model already" in capsys.readouterr().err


def test_a_lora_run_replaces_a_full_model_in_output_and_the_other_way_round(tiny_model_dir, tmp_path, write_jsonl):
    output, data = tmp_path / "out", write_jsonl(PAIRS)
    assert fine_tune.main(full_args(tiny_model_dir, data, output, "--epochs", "1")) == 0
    assert fine_tune.main(full_args(tiny_model_dir, data, output, "--epochs", "1", full=False)) == 0
    assert fine_tune.trained_kind(output) == "adapter"
    assert not list(output.glob("model*.safetensors")) and not (output / fine_tune.FULL_MARK).exists()
    assert fine_tune.main(full_args(tiny_model_dir, data, output, "--epochs", "1")) == 0
    assert fine_tune.trained_kind(output) == "full" and not list(output.glob("adapter_*"))
