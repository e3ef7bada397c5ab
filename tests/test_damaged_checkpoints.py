"""--resume and damaged checkpoints: the newest readable one is used and the damage is named; none, one line."""

import shutil

import pytest

import fine_tune

FILES = ["adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"]


def train_args(model_dir, data, output, *extra):
    return [str(arg) for arg in ["--model", model_dir, "--data", data, "--output", output, "--eval-questions",
            "none", "--no-replay", "--skip-original", "--epochs", "1", "--save-steps", "2", *extra]]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_model_dir, subset, tmp_path_factory):
    """An unfinished run's folder: checkpoints 2 and 4, no adapter yet."""
    output = tmp_path_factory.mktemp("trained") / "out"
    assert fine_tune.main(train_args(tiny_model_dir, subset, output, "--keep-checkpoints")) == 0
    for file in output.iterdir():
        if file.is_file():  # the adapter, report.json, loss.png: it has not finished
            file.unlink()
    assert [path.name for path in fine_tune.complete_checkpoints(output)][:2] == ["checkpoint-4", "checkpoint-2"]
    return output


@pytest.fixture
def output(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "out")
    return tmp_path / "out"


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_whole_checkpoint_has_no_damage(trained):
    assert fine_tune.checkpoint_damage(trained / "checkpoint-4") is None


@pytest.mark.parametrize("name", FILES)
def test_a_truncated_file_is_named(name, output):
    truncate(output / "checkpoint-4" / name)
    assert fine_tune.checkpoint_damage(output / "checkpoint-4") == f"{name} is truncated or unreadable"


def test_a_changed_byte_inside_the_optimizer_state_is_found(output):
    path = output / "checkpoint-4" / "optimizer.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # in the tensor data, which torch.load would read without complaint
    path.write_bytes(bytes(data))
    assert fine_tune.checkpoint_damage(output / "checkpoint-4") == "optimizer.pt is truncated or unreadable"


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "optimizer.pt"])
def test_resume_falls_back_to_the_checkpoint_before_a_damaged_one_and_says_so(
    name, output, tiny_model_dir, subset, capsys
):
    truncate(output / "checkpoint-4" / name)
    assert fine_tune.main(train_args(tiny_model_dir, subset, output, "--resume")) == 0
    out = capsys.readouterr().out
    assert f"Warning: {output / 'checkpoint-4'} is damaged ({name} is truncated or unreadable); it is skipped" in out
    assert f"Resuming from {output / 'checkpoint-2'}" in out
    assert (output / "adapter_config.json").is_file()


def test_resume_refuses_in_one_line_when_no_checkpoint_can_be_read(output, tiny_model_dir, subset, capsys):
    for checkpoint in fine_tune.complete_checkpoints(output):
        truncate(checkpoint / "optimizer.pt")
    assert fine_tune.main(train_args(tiny_model_dir, subset, output, "--resume")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: --resume: no checkpoint in {output} can be read (")
    assert err.endswith("optimizer.pt is truncated or unreadable); start again with --overwrite instead of --resume\n")

    named = output / "checkpoint-4"
    assert fine_tune.main(train_args(tiny_model_dir, subset, output, "--resume", named)) == 2
    assert capsys.readouterr().err == (
        f"error: --resume {named}: optimizer.pt is truncated or unreadable; pass an earlier checkpoint\n"
    )
