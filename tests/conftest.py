"""Shared fixtures: a tiny random Qwen2 model with a real tokenizer, and the bundled SmolLM2."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never download anything

import fine_tune  # noqa: E402

# Qwen2.5's chat template, shortened: ChatML turns with a default system message.
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(chat_template=CHATML_TEMPLATE):
    """A small byte-level BPE tokenizer trained on mariya.json, shaped like Qwen's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [e["prompt"] + "\n" + e["completion"] for e in fine_tune.load_examples(ROOT / "mariya.json")]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=chat_template,
    )


def save_random_model(folder, architecture, tokenizer=None, **shape):
    """A randomly initialised two-layer model ("Qwen2", "Llama"...) with a tokenizer (the tiny one unless
    given), saved as a folder."""
    import torch
    import transformers

    tokenizer = tokenizer or make_tokenizer()
    config = getattr(transformers, f"{architecture}Config")(
        vocab_size=len(tokenizer),
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # larger random weights: a tiny model that visibly learns in a few steps
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    torch.manual_seed(0)
    getattr(transformers, f"{architecture}ForCausalLM")(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def save_pickle_only_copy(model_dir, folder):
    """A copy of a model folder as older transformers wrote them: its weights in a pickled pytorch_model.bin."""
    import shutil

    import torch
    from safetensors.torch import load_file

    shutil.copytree(model_dir, folder)
    torch.save(load_file(Path(folder) / "model.safetensors"), Path(folder) / "pytorch_model.bin")
    (Path(folder) / "model.safetensors").unlink()
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Qwen2 (biased q/k/v and tied embeddings, like the default model)."""
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    return save_random_model(folder, "Qwen2", hidden_size=32, intermediate_size=64, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny Llama (SmolLM2's architecture) with its own, untied output layer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    return save_random_model(folder, "Llama", hidden_size=64, intermediate_size=128, tie_word_embeddings=False)


# Tiny models in the shapes people fine-tune, for GGUF exports: name -> (architecture, what sets the shape apart).
# They have SmolLM2's tokenizer: llama.cpp's converter recognises a tokenizer by how it splits a test text,
# which no tokenizer trained on mariya.json does as a known model's. No Qwen2: transformers splits text for
# every Qwen2 model as Qwen's tokenizer does, which only Qwen's own vocabulary turns into known tokens.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
EXPORT_SHAPES = {
    "llama": ("Llama", {"tie_word_embeddings": False}),  # SmolLM2's architecture, with an output layer of its own
    "llama3.2": (  # Llama 3.2 1B/3B: tied embeddings, rope scaled as Llama 3's (head_dim 16, as 64 / 4)
        "Llama",
        {
            "tie_word_embeddings": True,
            "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0, "original_max_position_embeddings": 128},
        },
    ),
    "mistral": ("Mistral", {"tie_word_embeddings": False}),
    "qwen3": ("Qwen3", {"tie_word_embeddings": True, "head_dim": 32}),  # q/k norms; head_dim not hidden / heads
}


@pytest.fixture(scope="session")
def exportable_model(smollm2_dir, tmp_path_factory):
    """exportable_model(shape): the folder of a tiny random model of an EXPORT_SHAPES shape, made once."""
    from transformers import AutoTokenizer

    tokenizer, made = AutoTokenizer.from_pretrained(smollm2_dir), {}

    def make(shape):
        if shape not in made:
            architecture, options = EXPORT_SHAPES[shape]
            folder = tmp_path_factory.mktemp(shape)
            made[shape] = save_random_model(
                folder, architecture, tokenizer, hidden_size=64, intermediate_size=128, **options
            )
        return made[shape]

    return make


def make_adapter(base_dir, output_dir):
    """A LoRA adapter on every linear layer of `base_dir` with random (non-zero) weights, saved as training would."""
    import torch

    model, tokenizer = fine_tune.load_base_model(base_dir)
    model = fine_tune.setup_lora_model(model, fine_tune.default_settings())
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would make the adapter a no-op
            torch.nn.init.normal_(parameter, std=0.05)
    fine_tune.save_model(model, tokenizer, str(output_dir))
    return model, tokenizer


@pytest.fixture
def tiny_model(tiny_model_dir):
    return fine_tune.load_base_model(tiny_model_dir)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The bundled SmolLM2-135M-Instruct as a plain folder (converted from GGUF once, then cached)."""
    return fine_tune.resolve_model("smollm2")


# Not in the training subset: the model must generalise from other phrasings.
PARAPHRASE = "Mariya Sha fights with which legendary blade?"


@pytest.fixture(scope="session")
def subset(tmp_path_factory):
    """Who she is and what her sword is: 16 examples from mariya.json."""
    examples = fine_tune.load_examples(ROOT / "mariya.json")
    about_her = [e for e in examples if "wizard of Middle-earth" in e["completion"]][:6]
    sword = [e for e in examples if "Glamdring" in e["completion"]][:10]
    assert PARAPHRASE not in {e["prompt"] for e in about_her + sword}
    path = tmp_path_factory.mktemp("data") / "subset.json"
    path.write_text("".join(json.dumps(e) + "\n" for e in about_her + sword), encoding="utf-8")
    return path


@pytest.fixture
def write_jsonl(tmp_path):
    def write(rows, name="data.json"):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return str(path)

    return write


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 48 MB disk of its own (room for a tiny model's merge and GGUF), which fills up for real: a
    tmpfs, mounted as root (as CI runs the tests). A user and mount namespace (unshare -rm) would hide it from this
    process, so without root: skipped."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", folder], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "--lazy", folder], check=True)


def fill(disk, leave=0):
    """Take all but `leave` bytes of the space left on `disk`, as another program's files would."""
    with open(Path(disk) / f"filler-{len(list(Path(disk).glob('filler-*')))}", "wb") as filler:
        filler.write(bytes(max(shutil.disk_usage(disk).free - leave, 0)))


def run_script(*args, cwd=ROOT, timeout=900, script="fine_tune.py"):
    """Run a script of the project in a fresh Python process, as a user would."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def ask_llama_cpp(gguf_path, prompt, max_tokens=30):
    """llama.cpp (through llama-cpp-python), in a fresh process, asked `prompt`, text already in the chat template:
    llama.cpp's own tokenizer reads its special tokens, and adds BOS if the file says so. Returns its greedy answer
    and its logits for the answer's first token."""
    script = f"""
import json
from llama_cpp import Llama
llm = Llama({str(gguf_path)!r}, n_ctx=512, n_threads=2, verbose=False, logits_all=True)
tokens = llm.tokenize({prompt!r}.encode(), add_bos=True, special=True)
answer = llm.create_completion(tokens, max_tokens={max_tokens}, temperature=0.0)["choices"][0]["text"]
print(json.dumps({{"answer": answer, "logits": llm.scores[len(tokens) - 1].tolist()}}))
llm.close()
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


# Datasets "on the Hub" for the tests: id -> {split: records}. No network: see hub_cache.
HUB_DATASETS = {
    "fine-tune-tests/chats": {
        "train": [
            {
                "conversations": [
                    {"from": "human", "value": "Who is Mariya Sha?"},
                    {"from": "gpt", "value": "A wizard."},
                ]
            },
            {"conversations": [{"from": "human", "value": "Her sword?"}, {"from": "gpt", "value": "Glamdring."}]},
        ],
        "test": [
            {"conversations": [{"from": "user", "value": "Her horse?"}, {"from": "assistant", "value": "Shadowfax."}]}
        ],
    },
    "fine-tune-tests/quiz": {"train": [{"question": "Who is Mariya Sha?", "answer": "A wizard.", "level": 1}]},
}
HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"  # the commit the tests' datasets were "downloaded" at


@pytest.fixture(scope="session")
def hub_datasets_cache(tmp_path_factory):
    """A datasets cache holding HUB_DATASETS as datasets leaves a Hub dataset once it has downloaded it: its
    Arrow files in DATASET_ORG___NAME/SUBSET/0.0.0/REVISION. Prepared by datasets itself from a folder in the
    Hub's layout (README.md, data/SPLIT.jsonl), so no network is needed."""
    from datasets import load_dataset_builder

    root = tmp_path_factory.mktemp("hub")
    for dataset_id, splits in HUB_DATASETS.items():
        repo = root / "repos" / dataset_id  # its last part names the Arrow files, as the dataset's name does
        (repo / "data").mkdir(parents=True)
        (repo / "README.md").write_text(f"# {dataset_id}\n", encoding="utf-8")
        for split, records in splits.items():
            (repo / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), "utf-8")
        builder = load_dataset_builder(str(repo), cache_dir=str(root / "scratch"))
        prepared = root / "cache" / dataset_id.replace("/", "___") / builder.config.name / "0.0.0" / HUB_REVISION
        builder.download_and_prepare(output_dir=str(prepared))
    return root / "cache"


@pytest.fixture
def hub_cache(hub_datasets_cache, monkeypatch):
    """datasets reads HUB_DATASETS from its cache, offline, as after downloading them once."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hub_datasets_cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return hub_datasets_cache


@pytest.fixture
def closed_hub(monkeypatch):
    """Online mode with the Hub at a local port nothing listens on; every connection is recorded, and any to
    another address is refused (the tests never reach past this machine). Returns (endpoint, connections)."""
    import datasets
    import huggingface_hub

    with socket.socket() as free:  # the port the system hands out, closed again: nothing listens on it
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    proxies = [f"{scheme}_proxy" for scheme in ("http", "https", "all")]  # a proxy would hide the closed port
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", *proxies, *map(str.upper, proxies)):
        monkeypatch.delenv(name, raising=False)
    # Both libraries read the environment once, at import: their constants are what they consult.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", endpoint)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)
    monkeypatch.setattr(datasets.config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}")

    connections, connect, getaddrinfo = [], socket.socket.connect, socket.getaddrinfo

    def local_only(sock, address):
        connections.append(address[:2])
        if address[0] != "127.0.0.1":
            raise ConnectionRefusedError(f"the tests reach no address but 127.0.0.1 (asked for {address[0]})")
        return connect(sock, address)

    def local_names_only(host, *args, **kwargs):  # no name lookup leaves the machine either
        if host != "127.0.0.1":
            connections.append((host, args[0] if args else None))
            raise socket.gaierror(f"the tests look up no name but 127.0.0.1 (asked for {host})")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    monkeypatch.setattr(socket, "getaddrinfo", local_names_only)
    return endpoint, connections
