"""Recall and retention of a training recipe over several seeds: the measurements behind the defaults.

    python benchmarks/bench_recall.py                              # the default recipe, seeds 42 1 2
    python benchmarks/bench_recall.py --label r16 -- --lora-r 16   # fine_tune.py flags after --

For each seed it trains as fine_tune.py does (replay included), asks the scorecard in every form
(chat template, bare question, bare question and newline) and scores the answers against the base
model's, which are computed once per model and scorecard and cached. One seed proves little on 48
questions, so it prints each seed, then the mean and the spread, and writes everything as JSON.
"""

import argparse
import hashlib
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fine_tune

RESULTS = Path(__file__).resolve().parent / "results"
FORMS = fine_tune.ASK_FORMS


def base_answers(model, tokenizer, eval_questions, args, results=RESULTS):
    """The base model's scorecard answers in every form, cached by model, scorecard and answer length."""
    key = json.dumps([args.model, eval_questions, args.max_new_tokens, FORMS, args.precision], sort_keys=True)
    path = Path(results) / f"base-answers-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    answers = fine_tune.ask_questions(model, tokenizer, args.question, eval_questions, args.max_new_tokens, forms=FORMS)
    path.write_text(json.dumps(answers, indent=1, ensure_ascii=False), encoding="utf-8")
    return answers


def train_once(args, seed, eval_questions, output_dir, results=RESULTS):
    """One training run of the recipe in `args` with `seed`; returns its scores and training time."""
    import transformers

    transformers.set_seed(seed)
    precision, _ = fine_tune.choose_precision(args.precision)
    model_path = fine_tune.resolve_model(args.model, args.cache_dir)
    model, tokenizer = fine_tune.load_base_model(model_path, precision=precision)
    before = base_answers(model, tokenizer, eval_questions, args, results)
    examples = fine_tune.load_examples(args.data)
    everyday = fine_tune.everyday_answers(eval_questions, before)
    dataset, taught = fine_tune.make_dataset(args, examples, model, tokenizer, everyday)
    model = fine_tune.setup_lora_model(model, args)
    started = time.perf_counter()
    settings = argparse.Namespace(**{**vars(args), "seed": seed, "output": str(output_dir)})
    trainer = fine_tune.train_model(model, tokenizer, dataset, settings, precision=precision)
    train_seconds = time.perf_counter() - started
    fine_tune.save_model(model, tokenizer, output_dir)  # kept for a closer look (benchmarks/results is not tracked)
    # Asked as fine_tune.py asks: the saved adapter on a freshly loaded base model (not the compiled training copy).
    model, tokenizer = fine_tune.load_finetuned_model(output_dir, model_path, precision=precision)
    after = fine_tune.ask_questions(model, tokenizer, args.question, eval_questions, args.max_new_tokens, forms=FORMS)
    scores = fine_tune.score(eval_questions, before, after, taught)
    return {
        "seed": seed,
        "precision": precision,
        "train_seconds": round(train_seconds, 1),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),  # this process so far
        "compiled": fine_tune.layers_compiled(trainer.model),
        "samples": len(dataset),
        "final_train_loss": trainer.state.log_history[-1]["train_loss"],
        "question_answer": after["question"],
        "scores": {form: {k: v for k, v in s.items() if k not in fine_tune.PER_QUESTION} for form, s in scores.items()},
        "leaked_terms": {form: s.get("leaked_terms") for form, s in scores.items()},
        "answers": after,
    }


def one_line(run):
    """Recall/retention/leaks per form, e.g. "chat 46%/81%/2, bare 40%/n/a/0", and the training time."""
    scores = [
        f"{form} {fine_tune.percent(s['recall_after'])}/{fine_tune.percent(s['retention'])}/{s.get('leaks')}"
        for form, s in run["scores"].items()
    ]
    return ", ".join(scores) + f", train {run['train_seconds']:.0f} s"


def summary(runs):
    """Mean and spread (standard deviation, min-max) of each score over the seeds."""
    table = {}
    for form in FORMS:
        for metric in ("recall_after", "retention", "leaks"):
            values = [run["scores"][form][metric] for run in runs]
            if None not in values:  # no retention where the base model answered no control right
                table[f"{form} {metric.replace('_after', '')}"] = values
    table["train seconds"] = [run["train_seconds"] for run in runs]
    return {
        name: {
            "mean": round(statistics.mean(values), 3),
            "stdev": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
        }
        for name, values in table.items()
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--label", default="default", help="name of the recipe in the results file")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON results and adapters")
    parser.add_argument("recipe", nargs="*", help="fine_tune.py flags (after --)")
    options = parser.parse_args(argv)
    args = fine_tune.parse_args(options.recipe)
    args.model = args.model or fine_tune.choose_model(None)[0]
    eval_questions = fine_tune.load_eval_questions(fine_tune.eval_file_for(args))
    fine_tune.quiet_libraries()
    options.results.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in options.seeds:
        output_dir = options.results / f"recall-{options.label}-seed{seed}"
        run = train_once(args, seed, eval_questions, output_dir, options.results)
        runs.append(run)
        print(f"{options.label} seed {seed}: {one_line(run)}", flush=True)
    result = {"label": options.label, "recipe": options.recipe, "runs": runs, "summary": summary(runs)}
    (options.results / f"recall-{options.label}.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    for name, stats in result["summary"].items():
        print(f"  {name:<24} mean {stats['mean']:.3f}  stdev {stats['stdev']:.3f}  [{stats['min']}, {stats['max']}]")


if __name__ == "__main__":
    main()
