"""The real thing: the bundled SmolLM2-135M-Instruct learns about Mariya Sha from a few examples."""

import json

import pytest
from conftest import PARAPHRASE, run_script


@pytest.fixture(scope="module")
def trained(subset, smollm2_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("run") / "adapter"
    completed = run_script(
        "--model", "smollm2", "--data", subset, "--output", output, "--epochs", "4", "--lr", "2e-3",
        "--batch-size", "4", "--no-replay", "--max-new-tokens", "30",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return output, completed.stdout


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
        "--model", "smollm2", "--output", output, "--skip-original", "--skip-training", "--question", PARAPHRASE
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Glamdring" in completed.stdout.split("After:", 1)[1]
    report = json.loads((output / "report.json").read_text())
    assert "training" in report, "testing an adapter leaves the training run's report alone"
