"""Runs that fail say so and lose nothing: NaN losses stop, reports stay private (full disks: test_full_disk.py)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_adapter, save_pickle_only_copy

import fine_tune


def tiny_run(model_dir, data, output, *extra):
    """A short run of the tiny model; its cache (and so the base model's remembered answers) is its own."""
    return ["--model", str(model_dir), "--data", str(data), "--output", str(output), "--no-replay",
            "--eval-questions", "none", "--cache-dir", str(Path(output).parent / "cache"), *extra]  # fmt: skip


def test_a_loss_that_becomes_nan_stops_training_with_advice_and_saves_nothing(tiny_model_dir, subset, tmp_path, capsys):
    output = tmp_path / "out"
    assert fine_tune.main(tiny_run(tiny_model_dir, subset, output, "--skip-original", "--lr", "1e20")) == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert last_line.startswith("error: the training loss stopped being a number at step ")
    assert "lower --lr" in last_line
    assert not (output / "adapter_config.json").exists() and not (output / "report.json").exists()


@pytest.mark.parametrize("where", ["transformers.Trainer.train", "transformers.GenerationMixin.generate"])
def test_running_out_of_gpu_memory_gives_advice_and_keeps_the_earlier_adapter(
    where, tiny_model_dir, subset, tmp_path, monkeypatch, capsys
):
    output = tmp_path / "out"
    make_adapter(tiny_model_dir, output)
    (output / "report.json").write_text('{"the": "earlier run"}')
    before = {path: path.read_bytes() for path in output.iterdir()}

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(where, out_of_memory)
    assert fine_tune.main(tiny_run(tiny_model_dir, subset, output, "--batch-size", "4")) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: the GPU ran out of memory; lower --batch-size (now 4) or --max-length (now 128), "
        "or add --gradient-checkpointing or --load-in-4bit"
    )
    assert {path: path.read_bytes() for path in before} == before
    assert {path.name for path in output.iterdir()} - {path.name for path in before} <= {fine_tune.OUTPUT_LOCK}


def test_a_run_that_learned_nothing_says_so(tiny_model_dir, subset, tmp_path, capsys):
    assert fine_tune.main(tiny_run(tiny_model_dir, subset, tmp_path / "out", "--lr", "1e-9", "--epochs", "2")) == 0
    out = capsys.readouterr().out
    assert "Warning: the training loss did not fall" in out and "--lr too low" in out
    assert json.loads((tmp_path / "out" / "report.json").read_text())["warning"].startswith("Warning: the training")


def test_an_unchanged_answer_is_called_out_when_the_loss_fell():
    log = [{"loss": value} for value in (3.0, 2.5, 1.0, 0.5)]
    assert fine_tune.learning_warning({"question": "I do not know."}, {"question": "A wizard."}, log) is None
    warning = fine_tune.learning_warning({"question": "I do not know."}, {"question": "I do not know."}, log)
    assert warning.startswith("Warning: the answer to the question did not change")


def test_report_holds_no_token_no_environment_and_no_home_folder(tiny_model_dir, subset, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_123")
    output = home / "runs" / "out"
    assert fine_tune.main(tiny_run(tiny_model_dir, subset, output, "--skip-original", "--epochs", "1")) == 0
    text = (output / "report.json").read_text()
    assert "hf_secret_token_123" not in text and str(home) not in text
    assert json.loads(text)["settings"]["output"] == "~/runs/out"


def test_pickle_weights_load_only_when_allowed(tiny_model_dir, tmp_path):
    folder = save_pickle_only_copy(tiny_model_dir, tmp_path / "old-model")
    with pytest.raises(fine_tune.UsageError, match="pass --allow-pickle if you trust where it came from"):
        fine_tune.load_base_model(folder)
    model, _ = fine_tune.load_base_model(folder, allow_pickle=True)
    assert model.config.model_type == "qwen2"


def test_gradient_checkpointing_recomputes_each_layer_and_trains_to_the_same_weights(tiny_model_dir, tmp_path):
    results, layer_calls = [], []
    for checkpointing in (False, True):
        model, tokenizer = fine_tune.load_base_model(tiny_model_dir)
        examples = fine_tune.load_examples(fine_tune.HERE / "mariya.json")[:16]
        dataset = fine_tune.load_and_preprocess_data(examples, tokenizer, bare_share=0)  # 16 pairs: 2 steps of 8
        torch.manual_seed(0)  # the same initial LoRA weights
        settings = fine_tune.default_settings(
            output=str(tmp_path / str(checkpointing)), epochs=1, gradient_checkpointing=checkpointing
        )
        model = fine_tune.setup_lora_model(model, settings)
        calls, mlp = [], model.base_model.model.model.layers[0].mlp
        forward = mlp.forward  # counted by hand: module hooks do not run when the backward pass recomputes
        mlp.forward = lambda *args, calls=calls, forward=forward, **kwargs: calls.append(1) or forward(*args, **kwargs)
        fine_tune.train_model(model, tokenizer, dataset, settings)
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        layer_calls.append(len(calls))
    assert layer_calls == [2, 4], "with checkpointing, the backward pass runs each layer's forward again"
    plain, checkpointed = results
    assert all(torch.allclose(plain[name], checkpointed[name], atol=1e-5) for name in plain)


def test_overwrite_replaces_an_adapter_trained_on_another_base_model(tiny_model_dir, tiny_llama_dir, subset, tmp_path):
    output = tmp_path / "out"
    make_adapter(tiny_llama_dir, output)
    argv = tiny_run(tiny_model_dir, subset, output, "--skip-original", "--epochs", "1")
    assert fine_tune.main(argv) == 2
    assert fine_tune.adapter_base_model(output) == tiny_llama_dir, "refused without --overwrite, nothing changed"
    assert fine_tune.main([*argv, "--overwrite"]) == 0
    assert fine_tune.adapter_base_model(output) == tiny_model_dir
