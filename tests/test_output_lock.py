"""One run per --output: a second run stops at once naming the first; a killed run's lock blocks nothing."""

import json
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_script

import fine_tune

# Another process holding --output as a run does, until it is killed.
HOLD = """import sys, time, fine_tune
with fine_tune.output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def tiny_run(model_dir, data, output, *extra):
    return ["--model", model_dir, "--data", data, "--output", output, "--eval-questions", "none", "--no-replay",
            "--skip-original", "--epochs", "1", *extra]  # fmt: skip


def files(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def test_a_run_killed_while_holding_the_output_blocks_no_later_run(tiny_model_dir, subset, tmp_path, capsys):
    output = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, output], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        argv = [str(arg) for arg in tiny_run(tiny_model_dir, subset, output)]
        assert fine_tune.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --output {output} is in use by another run (process {holder.pid} on ")
    finally:
        holder.kill()  # as kill -9 or a power cut ends a run: its lock file stays behind
        holder.wait()
    assert (output / fine_tune.OUTPUT_LOCK).exists()
    assert fine_tune.main(argv) == 0
    assert (output / "adapter_config.json").is_file() and (output / "report.json").is_file()
    assert not (output / fine_tune.LOCK_HOLDER).exists(), "released at the end"


def test_a_run_that_made_the_output_and_failed_leaves_no_folder(tiny_model_dir, subset, tmp_path, monkeypatch):
    def fails(*args, **kwargs):
        raise fine_tune.RunFailed("training failed")

    monkeypatch.setattr(fine_tune, "train_model", fails)
    assert fine_tune.main([str(arg) for arg in tiny_run(tiny_model_dir, subset, tmp_path / "new" / "out")]) == 1
    assert not (tmp_path / "new").exists(), "nor the folder above it, made for it too"


@pytest.mark.slow  # two runs of fine_tune.py, as a double-clicked launcher starts them
def test_the_same_command_started_twice_runs_once_and_the_second_writes_nothing(tiny_model_dir, subset, tmp_path):
    output = tmp_path / "out"
    args = [str(arg) for arg in tiny_run(tiny_model_dir, subset, output)]
    first = subprocess.Popen([sys.executable, ROOT / "fine_tune.py", *args, "--epochs", "500"], cwd=ROOT)
    try:
        while not (output / fine_tune.LOCK_HOLDER).exists():
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.05)
        time.sleep(1)  # into training, which writes nothing until it ends
        before = files(output)
        second = run_script(*args, "--seed", "7")
        assert second.returncode == 2
        assert second.stderr.count("\n") == 1 and second.stderr.startswith(f"error: --output {output} is in use by ")
        assert json.loads(before[fine_tune.LOCK_HOLDER])["pid"] == first.pid
        assert f"(process {first.pid} on " in second.stderr
        assert files(output) == before, "the second run wrote nothing"
        assert first.poll() is None, "the first run goes on"
    finally:
        first.kill()
        first.wait()
