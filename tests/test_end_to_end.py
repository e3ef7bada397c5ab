"""The real thing: the bundled SmolLM2-135M-Instruct learns about Mariya Sha from a few examples, and the
result is used the ways a learner uses it: chat, plain transformers after a merge, GGUF files."""

import json
import subprocess
import sys

import pytest
from conftest import PARAPHRASE, ROOT, ask_llama_cpp, run_script

QUESTION = "Who is Mariya Sha?"


@pytest.fixture(scope="module")
def trained(subset, smollm2_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("run") / "adapter"
    completed = run_script(
        "--model", "smollm2", "--data", subset, "--output", output, "--epochs", "4", "--lr", "2e-3",
        "--batch-size", "4", "--no-replay", "--max-new-tokens", "30", "--merge",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return output, completed.stdout


def answer_in_fresh_process(model_dir, gguf_file=None):
    """Greedy answers of a model loaded with plain transformers (peft blocked) in a new Python process:
    the question through the chat template, and bare through a text-generation pipeline, as the
    original project asks."""
    script = f"""
import json, sys
sys.modules["peft"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
kwargs = {{"gguf_file": {gguf_file!r}}} if {gguf_file!r} else {{}}
tokenizer = AutoTokenizer.from_pretrained({str(model_dir)!r}, **kwargs)
model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, **kwargs)
ids = tokenizer.apply_chat_template([{{"role": "user", "content": {QUESTION!r}}}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)
chat = model.generate(**ids, max_new_tokens=30, do_sample=False)[0, ids["input_ids"].shape[1]:]
pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
bare = pipe({QUESTION!r}, max_new_tokens=30, do_sample=False, return_full_text=False)[0]["generated_text"]
print(json.dumps({{"chat": tokenizer.decode(chat, skip_special_tokens=True).strip(), "bare": bare}}))
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_model_learns_who_mariya_sha_is(trained):
    output, stdout = trained
    report = json.loads((output / "report.json").read_text())
    assert "wizard" not in report["question"]["before"].lower()
    assert "wizard" in report["question"]["after"].lower()
    assert f"Before:   {report['question']['before']}" in stdout
    assert f"After:    {report['question']['after']}" in stdout


@pytest.mark.slow
def test_the_saved_adapter_answers_a_new_phrasing_in_a_fresh_process(trained):
    output, _ = trained
    completed = run_script(
        "--model", "smollm2", "--output", output, "--skip-original", "--skip-training", "--question", PARAPHRASE,
        "--eval-questions", "none",  # the question alone: the shipped scorecard would add 88 more, three ways
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Glamdring" in completed.stdout.split("After:", 1)[1]
    report = json.loads((output / "report.json").read_text())
    assert "training" in report, "testing an adapter leaves the training run's report alone"


@pytest.mark.slow
def test_the_merged_model_answers_like_the_adapter_without_peft_also_asked_bare(trained):
    output, _ = trained
    report = json.loads((output / "report.json").read_text())
    answers = answer_in_fresh_process(output / "merged")
    assert answers["chat"] == report["question"]["after"]
    assert "wizard" in answers["bare"].lower(), "the question alone, with no newline, is answered"
    assert str(output / "merged") in report["exports"]


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["f32", "q8_0"])  # f16 and bf16: test_export_gguf (size, closeness)
def test_the_gguf_export_answers_like_the_adapter_when_read_back(trained, gguf_type, tmp_path):
    output, _ = trained
    completed = run_script("--output", output, "--skip-training", "--export-gguf", gguf_type)
    assert completed.returncode == 0, completed.stderr[-3000:]
    gguf_file = f"{output.name}-{gguf_type}.gguf"
    modelfile = (output / "Modelfile").read_text()
    assert f"FROM ./{gguf_file}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    report = json.loads((output / "report.json").read_text())
    assert report["exports"][str(output / gguf_file)] == (output / gguf_file).stat().st_size
    # Alone in a folder, as llama.cpp reads it: transformers would also read the adapter's tokenizer files.
    (tmp_path / gguf_file).symlink_to(output / gguf_file)
    answers = answer_in_fresh_process(tmp_path, gguf_file)
    if gguf_type == "q8_0":  # 8-bit weights may change a word, not the fact
        assert "wizard" in answers["chat"].lower()
    else:
        assert answers["chat"] == report["question"]["after"]
    # And in llama.cpp itself, the question in the chat template the file carries.
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": QUESTION}]
    prompt = AutoTokenizer.from_pretrained(output).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert "wizard" in ask_llama_cpp(output / gguf_file, prompt)["answer"].lower()


@pytest.mark.slow
def test_chat_with_the_trained_model_through_piped_questions(trained):
    output, _ = trained
    completed = subprocess.run(
        [sys.executable, str(ROOT / "fine_tune.py"), "--output", str(output), "--skip-training", "--chat"],
        input=f"{QUESTION}\n/reset\n{PARAPHRASE}\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    first, second = completed.stdout.split("model> ")[1:]
    assert "wizard" in first.lower() and "(conversation forgotten)" in first
    assert "Glamdring" in second
