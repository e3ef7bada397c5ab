"""Side-by-side training benchmark: the original recipe, fine_tune.py's and TRL's SFTTrainer on the same work.

    python benchmarks/bench_train.py                          # original, ours, ours-fp32, trl: smollm2, 1 epoch
    python benchmarks/bench_train.py --scale 10               # the data repeated 10 times
    python benchmarks/bench_train.py --model qwen2.5-3b-shape # GPU: random weights, Qwen2.5-3B's size
    python benchmarks/bench_train.py --recipes ours,packed,ours-2proc   # padding, packing, 2 processes

Recipes: original (the original project's, float32 as its code runs on a CPU); ours (fine_tune.py's default,
--precision auto: length-grouped batches padded to their longest example); ours-fp32 (the same in float32);
default (fine_tune.py's whole default epoch: the pairs, each answer as a statement, the replay answers, and
every default setting, as `python fine_tune.py` trains, compiled as it compiles); default-eager (the same, not
compiled), default-b8, default-b8-eager, default-b16 (other batch sizes);
packed (--packing); ours-2proc (the default in 2 processes started by torchrun; on a CPU, DDP over gloo);
trl (TRL's SFTTrainer, the peer a user would pick instead: the same pairs as conversational prompt/completion,
LoRA r=8 / alpha=32 on all linear layers, lr 2e-3, batch 8, at its best precision here, with its own defaults,
gradient checkpointing included); trl-fp32; trl-no-checkpointing (TRL without gradient checkpointing, as ours).
trl is a benchmark-only dependency: pip install "trl==1.16.*".

Each recipe trains in its own child process (same model, data and machine), so peak memory is
measured per recipe. Prints a table and writes it as JSON.
"""

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fine_tune

RECIPES = ("original", "ours", "ours-fp32", "trl", "default")  # also packed, ours-2proc, trl-fp32, default-*
# The default run's training, and the same with other flags: uncompiled, or the batch size of an earlier default.
DEFAULT_FLAGS = {
    "default": (),
    "default-eager": ("--compile", "off"),
    "default-b8": ("--batch-size", "8"),
    "default-b8-eager": ("--batch-size", "8", "--compile", "off"),
    "default-b16": ("--batch-size", "16"),
}
# Qwen2.5-3B-Instruct's architecture: same cost per step as the real model, random weights.
QWEN_3B_SHAPE = dict(
    hidden_size=2048,
    intermediate_size=11008,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def build_model(name, cache_dir, precision):
    """Model and tokenizer for a benchmark name: 'qwen2.5-3b-shape', or anything --model accepts."""
    if name != "qwen2.5-3b-shape":
        return fine_tune.load_base_model(fine_tune.resolve_model(name, cache_dir), precision=precision)
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    device = fine_tune.pick_device()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    _, tokenizer = fine_tune.load_base_model(fine_tune.resolve_model("smollm2", cache_dir))
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN_3B_SHAPE, dtype=dtype)).to(dtype)
    return model, tokenizer


def original_dataset(examples, tokenizer):
    """The original preprocessing: prompt + newline + completion, padded to 128, loss on every token."""
    from datasets import Dataset

    texts = [e["prompt"] + "\n" + e["completion"] for e in examples]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=128)
    return Dataset.from_dict({**encoded, "labels": [list(ids) for ids in encoded["input_ids"]]})


def train_original(model, tokenizer, examples, epochs, output_dir):
    """The original project's recipe: LoRA on q/k/v, lr 1e-3, batch 1, a checkpoint every epoch."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    dataset = original_dataset(examples, tokenizer)
    model = fine_tune.setup_lora_model(model, fine_tune.default_settings(target_modules="q_proj,k_proj,v_proj"))
    args = TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=epochs,
        learning_rate=1e-3,
        per_device_train_batch_size=1,
        logging_steps=25,
        save_strategy="epoch",
        report_to="none",
        fp16=model.device.type == "cuda",
        dataloader_pin_memory=model.device.type == "cuda",
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)
    return trainer, sum(map(sum, dataset["attention_mask"])), trainer.train


def train_ours(model, tokenizer, examples, epochs, output_dir, precision, packing=False):
    dataset = fine_tune.load_and_preprocess_data(examples, tokenizer)
    settings = fine_tune.default_settings(output=output_dir, epochs=epochs, packing=packing)
    model = fine_tune.setup_lora_model(model, settings)
    trainer = {}

    def train():  # fine_tune.train_model builds its Trainer and trains: both are timed, as a user waits for both
        trainer["trainer"] = fine_tune.train_model(model, tokenizer, dataset, settings, precision=precision)

    return trainer, sum(map(len, dataset["input_ids"])), train


def train_default(model, tokenizer, examples, epochs, output_dir, cache_dir, model_name, precision, flags=()):
    """fine_tune.py's default run's training: its whole dataset (replay answers remembered in cache_dir, asked
    once when missing, before the clock starts) and every default setting, but `flags`. It compiles as the default
    run of EPOCHS epochs would, however many epochs are measured."""
    args = fine_tune.parse_args(list(flags))
    remember = fine_tune.answers_folder(cache_dir, fine_tune.resolve_model(model_name, cache_dir), precision)
    dataset, _ = fine_tune.make_dataset(args, examples, model, tokenizer, remember=remember)
    model = fine_tune.setup_lora_model(model, args)
    compiling, _ = fine_tune.choose_compile(args.compile, model.device.type, len(dataset) * args.epochs)
    args.output, args.epochs, args.compile = output_dir, epochs, "on" if compiling else "off"
    trainer = {}

    def train():
        trainer["trainer"] = fine_tune.train_model(model, tokenizer, dataset, args, precision=precision)

    return trainer, sum(map(len, dataset["input_ids"])), train


def train_trl(model, tokenizer, examples, epochs, output_dir, precision, checkpointing=True):
    """TRL's SFTTrainer with the same LoRA, learning rate, batch and data, as conversational prompt/completion
    (it then learns the completions only, through the chat template, as ours does)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": e["prompt"]}],
                "completion": [{"role": "assistant", "content": e["completion"]}],
            }
            for e in examples
        ]
    )
    args = SFTConfig(
        output_dir=output_dir,
        num_train_epochs=epochs,
        learning_rate=2e-3,
        per_device_train_batch_size=8,
        max_length=fine_tune.MAX_LENGTH,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=model.device.type == "cpu",
        logging_steps=25,
        save_strategy="no",
        report_to="none",
        seed=fine_tune.SEED,
        gradient_checkpointing=checkpointing,  # TRL's default is on: less memory, more time
    )
    lora = LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    return trainer, sum(map(len, trainer.train_dataset["input_ids"])), trainer.train


def train_once(recipe, model_name, data, epochs, scale, cache_dir, output_dir):
    """Train one recipe in this process; returns its measurements."""
    import torch
    import transformers

    transformers.set_seed(fine_tune.SEED)
    fine_tune.quiet_libraries()
    examples = fine_tune.load_examples(data) * scale
    precision = "fp32" if recipe in ("original", "ours-fp32", "trl-fp32") else fine_tune.choose_precision()[0]
    # TRL gets plain float32 weights and does its own mixed precision (SFTConfig bf16), as its users run it.
    model, tokenizer = build_model(model_name, cache_dir, "fp32" if recipe.startswith("trl") else precision)
    if recipe == "original":
        trainer, real_tokens, train = train_original(model, tokenizer, examples, epochs, output_dir)
    elif recipe.startswith("default"):
        trainer, real_tokens, train = train_default(
            model, tokenizer, examples, epochs, output_dir, cache_dir, model_name, precision, DEFAULT_FLAGS[recipe]
        )
    elif recipe.startswith("trl"):
        checkpointing = recipe != "trl-no-checkpointing"
        trainer, real_tokens, train = train_trl(
            model, tokenizer, examples, epochs, output_dir, precision, checkpointing
        )
    else:
        packing = recipe == "packed"
        trainer, real_tokens, train = train_ours(model, tokenizer, examples, epochs, output_dir, precision, packing)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    train()
    seconds = time.perf_counter() - started
    trainer = trainer.get("trainer") if isinstance(trainer, dict) else trainer
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    samples = len(trainer.train_dataset)
    return {
        "recipe": recipe,
        "train_seconds": round(seconds, 2),
        "samples_per_second": round(samples * epochs / seconds, 3),
        "real_tokens_per_second": round(real_tokens * epochs / seconds, 1),
        "peak_memory_mb": round(peak_mb),
        "memory_kind": "cuda max allocated" if torch.cuda.is_available() else "process peak RSS",
        "final_train_loss": round(trainer.state.log_history[-1]["train_loss"], 4),
        # Trainer's own clock: the steps alone, without building the Trainer and compiling before them
        "steps_seconds": round(trainer.state.log_history[-1]["train_runtime"], 2),
        "samples": samples,
        "precision": precision,
        "processes": fine_tune.processes(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, qwen2.5-3b-shape, or any --model value")
    parser.add_argument("--data", default=fine_tune.DEFAULT_DATA_FILE)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--scale", type=int, default=1, help="repeat the data this many times")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="which recipes to run, comma-separated")
    parser.add_argument("--json", default="benchmarks/results/bench_train.json", help="where to write results")
    parser.add_argument("--cache-dir", default=str(fine_tune.DEFAULT_CACHE_DIR))
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one recipe, print JSON
    args = parser.parse_args(argv)
    output_dir = str(Path(args.json).parent / "checkpoints")
    if args.child:
        result = train_once(args.child, args.model, args.data, args.epochs, args.scale, args.cache_dir, output_dir)
        if fine_tune.is_main_process():
            print("RESULT " + json.dumps(result))
        return 0

    results = []
    for recipe in args.recipes.split(","):
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2"] if recipe.endswith("-2proc") else []
        arguments = argv if argv is not None else sys.argv[1:]
        command = [sys.executable, *launcher, __file__, *arguments, "--child", recipe]
        print(f"--- {recipe} recipe", flush=True)
        completed = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        if completed.returncode or not lines:
            print(completed.stdout[-2000:], file=sys.stderr)
            print(f"error: the {recipe} recipe failed (exit code {completed.returncode})", file=sys.stderr)
            return 1
        results.append(json.loads(lines[-1][len("RESULT ") :]))

    columns = [*list(results[0])[1:6], "final_train_loss"]
    print(
        f"\nmodel {args.model}, data {args.data} x{args.scale}, {args.epochs:g} epoch(s),",
        f"device {results[0]['device']}",
    )
    print(f"{'recipe':<10}" + "".join(f"{c:>24}" for c in columns))
    for r in results:
        print(f"{r['recipe']:<10}" + "".join(f"{r[c]:>24}" for c in columns))
    summary = {"model": args.model, "data": args.data, "scale": args.scale, "epochs": args.epochs}
    for result in results[1:]:
        speedup = result["samples_per_second"] / results[0]["samples_per_second"]
        summary[f"speedup_{result['recipe']}"] = round(speedup, 2)
        print(f"speed-up (samples/s, {result['recipe']} / {results[0]['recipe']}): {speedup:.2f}x")
    by_recipe = {result["recipe"]: result for result in results}
    for trl in ("trl", "trl-no-checkpointing"):
        if {"ours", trl} <= set(by_recipe):
            ratio = by_recipe["ours"]["samples_per_second"] / by_recipe[trl]["samples_per_second"]
            summary[f"ours_vs_{trl.replace('-', '_')}"] = round(ratio, 2)
            print(f"ours / {trl} (samples/s, each at its best precision): {ratio:.2f}x")
    if {"original", "default"} <= set(by_recipe):
        # The original trains 10 epochs; fine_tune.py's default EPOCHS of its larger epoch.
        original = by_recipe["original"]["train_seconds"] / args.epochs * 10
        default = by_recipe["default"]["train_seconds"] / args.epochs * fine_tune.EPOCHS
        summary["finished_model_speedup"] = round(original / default, 2)
        print(f"time to the finished model, original 10 epochs / default {fine_tune.EPOCHS} epochs: ", end="")
        print(f"{original:.0f} s / {default:.0f} s = {original / default:.2f}x")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({**summary, "results": results}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
