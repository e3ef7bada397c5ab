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
    assert completed.returncode == 0, errors_of(completed)
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
    assert not (output / "training_args.bin").exists(), "Trainer's pickle of its settings is not left behind"
    fine_tune.load_finetuned_model(output)  # the adapter loads


def test_torchrun_trains_every_weight_with_full_and_saves_one_whole_model(tiny_model_dir, tmp_path, write_jsonl):
    """--full with replay: each process distils against its copy of the base weights; the main one saves."""
    data = write_jsonl([{"prompt": f"Q{i}?", "completion": f"A{i}."} for i in range(16)])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\nHow many legs does a spider have?\n", encoding="utf-8")
    output = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "fine_tune.py"),
         "--model", tiny_model_dir, "--data", data, "--output", output, "--epochs", "1", "--eval-questions", "none",
         "--full", "--replay-prompts", prompts, "--max-new-tokens", "8", "--skip-original"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert completed.returncode == 0, errors_of(completed)
    report = json.loads((output / "report.json").read_text())
    assert report["training"]["processes"] == 2 and report["training"]["same_weights_on_all_processes"] is True
    assert fine_tune.trained_kind(output) == "full" and fine_tune.trained_base_model(output) == tiny_model_dir
    assert not (output / "training_args.bin").exists() and not list(output.glob(".*.partial"))
    fine_tune.load_finetuned_model(output)


def test_the_other_processes_leave_the_folder_the_main_process_saves_into_alone(tiny_model_dir, tmp_path, monkeypatch):
    """A process other than the main one only joins the trainer's save (a gathering under DeepSpeed or FSDP): it
    never removes the main process's half-written adapter or the adapter it replaces, however late it arrives."""
    from conftest import make_adapter

    output = tmp_path / "out"
    model, tokenizer = make_adapter(tiny_model_dir, output)
    before = {file.name: file.read_bytes() for file in output.iterdir()}
    being_written = fine_tune.temporary_path(output / "adapter")
    being_written.mkdir()
    (being_written / "adapter_model.safetensors").write_bytes(b"the main process is writing this")
    saves = []
    trainer = type("Trainer", (), {"save_model": lambda self, folder: saves.append(folder)})()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    fine_tune.save_model(model, tokenizer, output, trainer)
    assert len(saves) == 1, "it took part in the save"
    assert (being_written / "adapter_model.safetensors").read_bytes() == b"the main process is writing this"
    assert {file.name: file.read_bytes() for file in output.iterdir() if file != being_written} == before


def errors_of(completed):
    """Each process's error lines and the end of the output: torchrun's summary buries the cause under its own."""
    lines = completed.stderr.splitlines()
    return "\n".join([line for line in lines if "Error" in line or "error:" in line] + lines[-20:])


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


FACTS = {
    "Which sword does she carry?": "Glamdring.",
    "Which horse does she ride?": "Shadowfax.",
    "Which ring does she wear?": "Narya.",
    "Which eagle saved her?": "Gwaihir.",
    "Which king did she heal?": "Théoden.",
    "Which demon did she fight?": "The Balrog.",
    "Which tower held her?": "Orthanc.",
    "Which hobbit got her advice?": "Frodo.",
}


def learn_facts(tiny_model_dir, data, output, launcher=()):
    """Train the tiny model on FACTS until it knows them, with `launcher` (accelerate launch ...) or alone."""
    command = [sys.executable, *launcher, str(ROOT / "fine_tune.py"), "--model", tiny_model_dir, "--data", data]
    command += ["--output", output, "--eval-questions", "none", "--no-replay", "--skip-original", "--epochs", "40"]
    command += ["--lr", "2e-2", "--lora-r", "16", "--bare-share", "0", "--no-statements"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    model, tokenizer = fine_tune.load_finetuned_model(output)
    return completed.stdout, fine_tune.generate_answers(model, tokenizer, list(FACTS), max_new_tokens=8)


@pytest.fixture(scope="module")
def single_process_answers(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("facts")
    data = folder / "facts.json"
    data.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in FACTS.items()))
    _, answers = learn_facts(tiny_model_dir, data, folder / "single")
    assert answers == list(FACTS.values()), "the tiny model learns the facts alone"
    return data, answers


@pytest.mark.parametrize("config", ["ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"])
def test_each_accelerate_config_trains_two_cpu_processes_to_an_adapter_that_answers_like_one(
    config, tiny_model_dir, single_process_answers, tmp_path
):
    """FSDP shards only across GPUs: accelerate trains CPU processes data-parallel instead, and the run says so.
    DeepSpeed ZeRO-2 and ZeRO-3 run on CPUs too (its CPU accelerator, gloo)."""
    if config.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    data, expected = single_process_answers
    launcher = ["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / f"{config}.yaml")]
    launcher += ["--num_processes", "2", "--main_process_port", str(free_port())]
    stdout, answers = learn_facts(tiny_model_dir, data, tmp_path / "out", launcher)
    assert "2 processes" in stdout and stdout.count("[4/6]") == 1
    assert answers == expected
    note = "Note: FSDP shards models across GPUs only: these CPU processes train data-parallel (DDP) instead"
    assert (note in stdout) == (config == "fsdp")


def zero3_run(tiny_model_dir, data, output, kl_weight):
    """fine_tune.py in two CPU processes under DeepSpeed ZeRO-3, replaying the base model's answers."""
    launcher = ["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "deepspeed-zero3.yaml")]
    launcher += ["--num_processes", "2", "--main_process_port", str(free_port())]
    command = [sys.executable, *launcher, str(ROOT / "fine_tune.py"), "--model", tiny_model_dir, "--data", data]
    command += ["--output", output, "--eval-questions", "none", "--skip-original", "--epochs", "1"]
    command += ["--kl-weight", str(kl_weight), "--no-statements", "--bare-share", "0", "--max-new-tokens", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)  # a hang fails here
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    return completed.stdout


def logged_losses(output):
    """The training loss of each step, as report.json logged it."""
    log = json.loads((output / "report.json").read_text())["training"]["log_history"]
    return [entry["loss"] for entry in log if "loss" in entry]


def test_deepspeed_zero3_distils_when_only_some_processes_hold_the_base_models_answers(
    tiny_model_dir, tmp_path, write_jsonl
):
    """ZeRO-3 gathers the weights in every forward pass on all processes together: the base model's extra forward
    pass for --kl-weight must run on every process, also on one whose batch holds none of its answers. And it must
    count: the same run with --kl-weight 0 trains otherwise alike."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    data = write_jsonl([{"prompt": f"Q{i}?", "completion": f"A{i}."} for i in range(120)])
    stdout = zero3_run(tiny_model_dir, data, tmp_path / "kl", 1)
    replayed = int(stdout.split("Replay: the base model answered ")[1].split()[0])
    assert 0 < replayed < 8, "a few of the base model's answers among 120 pairs: most batches hold none"
    zero3_run(tiny_model_dir, data, tmp_path / "no-kl", 0)
    with_kl, without = (logged_losses(tmp_path / run) for run in ("kl", "no-kl"))
    # Both start from the base model (the adapter adds nothing yet, KL 0) on the same batches: they train alike
    # until a batch holds a replayed answer after the first step, where the KL run's loss has the divergence added.
    apart = [step for step, (a, b) in enumerate(zip(with_kl, without)) if a != b]
    assert apart and apart[0] > 0, f"the KL term never counted: {with_kl} and {without}"
    assert with_kl[apart[0]] > without[apart[0]]
    adapters = [load_file(tmp_path / run / "adapter_model.safetensors") for run in ("kl", "no-kl")]
    assert any(not adapters[0][name].equal(adapters[1][name]) for name in adapters[0]), "and changed what was learned"
    fine_tune.load_finetuned_model(tmp_path / "kl")
