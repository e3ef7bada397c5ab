"""The benchmarks run for real on a tiny model, so they cannot rot (no timing asserted)."""

import json

from conftest import run_script

import fine_tune


def test_benchmark_trains_each_recipe_on_the_same_pairs_and_writes_the_table(tiny_model_dir, write_jsonl, tmp_path):
    data = write_jsonl([{"prompt": f"Question {i}?", "completion": f"Answer number {i}."} for i in range(6)])
    result_file = tmp_path / "bench.json"
    completed = run_script(
        "--model", tiny_model_dir, "--data", data, "--epochs", "1", "--scale", "2", "--json", result_file,
        "--cache-dir", tmp_path / "cache", script="benchmarks/bench_train.py",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    table = json.loads(result_file.read_text())
    original, ours, ours_fp32, trl, default = table["results"]
    assert [row["recipe"] for row in table["results"]] == ["original", "ours", "ours-fp32", "trl", "default"]
    assert original["samples"] == ours["samples"] == trl["samples"] == 12
    # The default run's epoch: the pairs, each answer as a statement, and the base model's replay answers.
    assert default["samples"] > 2 * 12 and table["finished_model_speedup"] > 0
    for row in table["results"]:
        assert row["samples_per_second"] > 0 and row["peak_memory_mb"] > 0 and row["final_train_loss"] > 0
    # The original pads every sample to 128 tokens; ours trains on the real tokens only.
    assert ours["real_tokens_per_second"] / ours["samples_per_second"] < 128
    assert original["precision"] == ours_fp32["precision"] == "fp32"
    assert ours["precision"] == trl["precision"] == fine_tune.choose_precision()[0]
    assert table["speedup_ours"] > 0 and table["ours_vs_trl"] > 0
    assert "speed-up (samples/s, ours / original)" in completed.stdout


def test_recall_benchmark_trains_each_seed_and_summarises_the_scores(tiny_model_dir, write_jsonl, tmp_path):
    data = write_jsonl([{"prompt": f"Question {i}?", "completion": f"Answer number {i}."} for i in range(6)])
    scorecard = write_jsonl(
        [
            {"kind": "knowledge", "question": "Question 1, again?", "expect": ["number 1"]},
            {"kind": "control", "question": "Question 2?", "expect": ["Answer"]},
        ],
        name="scorecard.json",
    )
    completed = run_script(
        "--seeds", "1", "2", "--label", "tiny", "--results", tmp_path / "results", "--",
        "--model", tiny_model_dir, "--data", data, "--eval-questions", scorecard, "--epochs", "1",
        "--max-new-tokens", "4",
        script="benchmarks/bench_recall.py",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "recall-tiny.json").read_text())
    assert [run["seed"] for run in result["runs"]] == [1, 2]
    assert set(result["summary"]) >= {"chat recall", "bare recall", "train seconds"}
    assert "tiny seed 2: chat " in completed.stdout
