"""Several processes (torchrun, accelerate launch) train one model together; the main one speaks for all."""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import ROOT

import fine_tune

pytestmark = pytest.mark.slow  # two processes on two cores, a few seconds each


def test_torchrun_with_two_processes_trains_one_adapter_and_prints_once(tiny_model_dir, tmp_path, write_jsonl):
    data = write_jsonl(
        [
            {"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]}
            for i in range(40)
        ]
    )
    output = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "fine_tune.py"),
         "--model", tiny_model_dir, "--data", data, "--output", output, "--epochs", "2", "--eval-questions", "none",
         "--no-replay", "--packing"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    assert out.count("Question: Who is Mariya Sha?") == 1 and out.count("[1/6]") == 1, (
        "printed by the main process only"
    )
    assert "2 processes" in out
    report = json.loads((output / "report.json").read_text())
    training = report["training"]
    assert training["processes"] == 2 and training["same_weights_on_all_processes"] is True
    # 80 rows (40 conversations + 40 statements) in batches of 8 per process: 5 steps per epoch, not 10.
    assert training["steps"] == 10
    assert sorted(p.name for p in output.iterdir() if p.name.startswith(("adapter_", "report", "checkpoint"))) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "report.json",
    ]
    fine_tune.load_finetuned_model(output)  # the adapter loads


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_problem_found_by_the_main_process_stops_every_process_alike(tiny_model_dir, tmp_path):
    """--max-length 8 holds no answer: the main process finds it while tokenizing, and both exit with code 2."""
    port = free_port()
    command = [sys.executable, str(ROOT / "fine_tune.py"), "--model", tiny_model_dir, "--output", tmp_path / "out"]
    command += ["--eval-questions", "none", "--no-replay", "--bare-share", "0", "--max-length", "8"]
    ranks = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        ranks.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    (_, main_err), (other_out, other_err) = (rank.communicate(timeout=300) for rank in ranks)
    assert [rank.returncode for rank in ranks] == [2, 2]
    assert main_err.strip().splitlines()[-1].startswith("error: --max-length 8: no example keeps a single answer token")
    assert other_out == "" and "error" not in other_err
    assert not (tmp_path / "out").exists()
