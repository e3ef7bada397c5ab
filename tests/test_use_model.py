"""Using a trained adapter outside training: chat with it, merge it into a plain transformers model."""

import io
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, make_adapter

import fine_tune

PROBE = [[5, 17, 42, 99, 3, 250, 7]]  # token ids to compare logits on


@pytest.fixture(scope="module")
def qwen_adapter(tiny_model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("qwen-run") / "adapter"
    make_adapter(tiny_model_dir, output)
    return output


@pytest.mark.parametrize("base", ["tiny_model_dir", "tiny_llama_dir"])
def test_merged_model_computes_what_base_plus_adapter_computes(base, request, tmp_path):
    base_dir = request.getfixturevalue(base)
    model, _ = make_adapter(base_dir, tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(PROBE)).logits
        unchanged = model.get_base_model()(input_ids=torch.tensor(PROBE)).logits  # adapter layers still on
    fine_tune.merge_adapter(tmp_path / "adapter", base_dir, tmp_path / "merged")

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        logits = merged(input_ids=torch.tensor(PROBE)).logits
    assert torch.allclose(logits, expected, atol=1e-5), "merged weights must equal base + LoRA update"
    assert torch.allclose(unchanged, expected)
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_merged_folder_is_a_plain_model_in_the_base_dtype_with_tokenizer_and_template(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    base.save_pretrained(tmp_path / "bf16-base")
    fine_tune.load_base_model(tiny_model_dir)[1].save_pretrained(tmp_path / "bf16-base")
    make_adapter(str(tmp_path / "bf16-base"), tmp_path / "adapter")
    merged = fine_tune.merge_adapter(tmp_path / "adapter", str(tmp_path / "bf16-base"), tmp_path / "merged")

    files = {path.name for path in merged.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    assert not any(name.startswith("adapter") for name in files)
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    # A fresh process without peft: plain transformers and its text-generation pipeline.
    script = (
        "import sys; sys.modules['peft'] = None\n"  # importing peft now fails
        "from transformers import AutoTokenizer, pipeline\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(merged)!r})\n"
        "assert 'im_start' in tokenizer.chat_template\n"
        f"pipe = pipeline('text-generation', model={str(merged)!r})\n"
        "print(repr(pipe('Who is Mariya Sha?', max_new_tokens=5, do_sample=False)[0]['generated_text']))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.startswith("'Who is Mariya Sha?")


def test_merge_refuses_to_replace_a_folder_it_did_not_write(qwen_adapter, capsys):
    merged = qwen_adapter / "merged"
    merged.mkdir(exist_ok=True)
    (merged / "model.safetensors").write_text("someone else's model")
    assert fine_tune.main(["--output", str(qwen_adapter), "--skip-training", "--merge"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "merged holds files that fine_tune.py did not write" in error
    assert (merged / "model.safetensors").read_text() == "someone else's model"


def test_merge_refuses_to_replace_a_merge_of_another_base_model(qwen_adapter, capsys):
    merged = qwen_adapter / "merged"
    merged.mkdir(exist_ok=True)
    (merged / fine_tune.MERGE_MARK).write_text(json.dumps({"base_model": "Qwen/Qwen2.5-3B-Instruct"}))
    before = {path.name: path.read_bytes() for path in merged.iterdir()}
    assert fine_tune.main(["--output", str(qwen_adapter), "--skip-training", "--merge"]) == 2
    assert "merged holds a merge of Qwen/Qwen2.5-3B-Instruct" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in merged.iterdir()} == before, "nothing overwritten"


def test_merge_replaces_an_earlier_merge_of_the_same_base(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    make_adapter(tiny_model_dir, adapter)
    assert fine_tune.main(["--output", str(adapter), "--skip-training", "--merge"]) == 0
    weights = load_file(adapter / "adapter_model.safetensors")  # the adapter changes, as after training again
    save_file(
        {name: 2 * w if "lora_B" in name else w for name, w in weights.items()}, adapter / "adapter_model.safetensors"
    )
    assert fine_tune.main(["--output", str(adapter), "--skip-training", "--merge"]) == 0
    model, _ = fine_tune.load_finetuned_model(adapter)
    merged = AutoModelForCausalLM.from_pretrained(adapter / "merged").eval()
    with torch.no_grad():
        expected = model.eval()(input_ids=torch.tensor(PROBE)).logits
        assert torch.allclose(merged(input_ids=torch.tensor(PROBE)).logits, expected, atol=1e-5), "the new adapter"
    report = capsys.readouterr().out
    assert "Merged the adapter" in report and "[6/6]" not in report, "only merging: no questions asked"


def chat_with(model, tokenizer, lines, monkeypatch, system_prompt=None):
    """Run the chat with `lines` as stdin, recording the length of every prompt the model is given."""
    lengths = []
    generate = model.generate

    def recording_generate(input_ids, **kwargs):
        lengths.append(input_ids.shape[1])
        return generate(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    fine_tune.chat(model, tokenizer, reply_tokens=4, system_prompt=system_prompt)
    return lengths


def test_chat_keeps_the_conversation_until_reset(tiny_model, monkeypatch, capsys):
    model, tokenizer = tiny_model
    lengths = chat_with(
        model, tokenizer, ["Who is Mariya Sha?", "And her sword?", "/reset", "And her sword?"], monkeypatch
    )
    first, follow_up, after_reset = lengths
    assert follow_up > first, "the follow-up is asked with the first question and answer before it"
    assert after_reset < follow_up and after_reset == len(fine_tune.prompt_ids(tokenizer, "And her sword?"))
    out = capsys.readouterr().out
    assert out.count("model> ") == 3 and "(conversation forgotten)" in out and out.rstrip().endswith("Bye.")


def test_chat_asks_after_the_system_prompt_also_after_reset(tiny_model, monkeypatch):
    model, tokenizer = tiny_model
    question, system = "Who is Mariya Sha?", "Speak as Gandalf."
    lengths = chat_with(model, tokenizer, [question, "/reset", question], monkeypatch, system_prompt=system)
    assert lengths[0] == lengths[1] == len(fine_tune.prompt_ids(tokenizer, question, "chat", system))
    assert lengths[0] != len(fine_tune.prompt_ids(tokenizer, question, "chat"))


def test_chat_answers_stream_as_they_are_generated(tiny_model, monkeypatch):
    model, tokenizer = tiny_model
    answer = fine_tune.generate_answers(model, tokenizer, ["Who is Mariya Sha?"], max_new_tokens=4)[0]
    screen, seen_when_generated = io.StringIO(), []
    generate = model.generate

    def generate_and_look(*args, **kwargs):
        output = generate(*args, **kwargs)
        seen_when_generated.append(screen.getvalue())  # what the user saw by the time the answer was complete
        return output

    monkeypatch.setattr(model, "generate", generate_and_look)
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Who is Mariya Sha?\n/exit\nnever asked\n"))
    fine_tune.chat(model, tokenizer, reply_tokens=4)
    assert seen_when_generated[0].rstrip().endswith(f"model> {answer}"), "printed while generated, not after"
    assert "never asked" not in screen.getvalue(), "/exit leaves at once"


def test_chat_from_the_command_line_ends_cleanly_at_end_of_input(qwen_adapter):
    completed = subprocess.run(
        [sys.executable, str(ROOT / "fine_tune.py"), "--output", str(qwen_adapter), "--skip-training", "--chat"],
        input="Who is Mariya Sha?\n/reset\nWhich sword does she carry?\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.count("model> ") == 2 and "(conversation forgotten)" in completed.stdout
    assert "Traceback" not in completed.stderr


def test_ctrl_c_in_the_chat_leaves_with_exit_code_0(qwen_adapter):
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "fine_tune.py"), "--output", str(qwen_adapter), "--skip-training", "--chat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    seen = ""
    while "you> " not in seen:  # wait until it is waiting for input
        character = process.stdout.read(1)
        assert character, process.stderr.read()[-2000:]
        seen += character
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0
    assert "Bye." in out and "Traceback" not in err


def test_export_of_an_unknown_gguf_type_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        fine_tune.main(["--export-gguf", "q3_k"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--export-gguf: invalid choice: 'q3_k'" in error and "q8_0" in error


def test_export_of_an_unsupported_architecture_is_refused_before_training(
    exportable_model, tmp_path, write_jsonl, capsys
):
    """OPT is one of the architectures llama.cpp's converter does not take; its tokenizer is one it knows."""
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(exportable_model("llama"))
    config = OPTConfig(
        hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=len(tokenizer)
    )
    OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    capsys.readouterr()
    data = write_jsonl([{"prompt": "Who is Mariya Sha?", "completion": "A wizard."}])
    output = tmp_path / "out"
    args = ["--model", str(tmp_path / "opt"), "--data", data, "--output", str(output), "--export-gguf"]
    assert fine_tune.main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "OPTForCausalLM is not supported" in error, error
    assert "use --merge and convert OUTPUT/merged by hand" in error
    assert not output.exists(), "refused before any training"
