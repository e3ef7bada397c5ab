"""Interrupted runs: Ctrl-C saves a checkpoint and says how to resume; a killed run resumes to the same adapter."""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_script
from safetensors.torch import load_file

import fine_tune

pytestmark = pytest.mark.slow  # each test trains the tiny model two or three times in fresh processes


def train_args(model_dir, output, *extra):
    return [
        "--model", model_dir, "--output", output, "--eval-questions", "none",
        "--no-replay", "--skip-original", "--seed", "3", "--compile", "off", *extra,
    ]  # fmt: skip


def start(*args):
    """fine_tune.py in a fresh process, as a user starts it (in its own process group, like a terminal's job)."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "fine_tune.py"), *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )


def wait_for(condition, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def adapter_weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_ctrl_c_saves_a_checkpoint_and_prints_the_command_that_resumes_it(tiny_model_dir, tmp_path):
    output = tmp_path / "out"
    args = train_args(tiny_model_dir, output, "--epochs", "4", "--save-steps", "5")
    process = start(*args)
    wait_for(lambda: (output / "checkpoint-5" / fine_tune.RUN_FINGERPRINT).exists(), process)  # training runs
    os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C does
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    checkpoints = fine_tune.complete_checkpoints(output)
    assert checkpoints and not (output / "adapter_config.json").exists()
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith(f"Interrupted: checkpoint saved in {checkpoints[0]}. To continue: python fine_tune.py")
    command = shlex.split(last_line.split("To continue: ", 1)[1])
    assert command[2:] == [*map(str, args), "--resume"]

    resumed = run_script(*command[2:])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resuming from {checkpoints[0]}" in resumed.stdout
    assert (output / "adapter_config.json").is_file() and not list(output.glob("checkpoint-*")), "removed once done"


def test_a_killed_run_resumes_to_the_adapter_of_an_uninterrupted_run(tiny_model_dir, tmp_path):
    data = tmp_path / "data.json"
    shutil.copy(ROOT / "mariya.json", data)
    whole = run_script(*train_args(tiny_model_dir, tmp_path / "whole", "--epochs", "6", "--data", data))
    assert whole.returncode == 0, whole.stderr[-2000:]

    output = tmp_path / "killed"
    args = train_args(tiny_model_dir, output, "--epochs", "6", "--save-steps", "25", "--data", data)
    process = start(*args)
    # Killed in the second epoch (59 steps each), so the resumed run must also replay the epoch's batch order.
    wait_for(lambda: (output / "checkpoint-75" / fine_tune.RUN_FINGERPRINT).exists(), process)
    process.kill()
    process.communicate()
    assert not (output / "adapter_config.json").exists(), "killed before it finished"

    changed = run_script(*args, "--lr", "0.001", "--resume")
    assert changed.returncode == 2 and "was trained with a different --lr; run with the same" in changed.stderr
    original = data.read_text(encoding="utf-8")
    data.write_text(original + '{"prompt": "One more?", "completion": "Yes."}\n', encoding="utf-8")
    edited = run_script(*args, "--resume")
    assert edited.returncode == 2 and "was trained with a different data file" in edited.stderr
    data.write_text(original, encoding="utf-8")

    resumed = run_script(*args, "--resume", "--keep-checkpoints")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming from" in resumed.stdout
    assert fine_tune.complete_checkpoints(output), "kept, as asked"
    expected, got = adapter_weights(tmp_path / "whole"), adapter_weights(output)
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] - got[name]).abs().max() < 1e-5, name
