"""The GGUF conversion cache serves a converted model only for the very file it came from."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import fine_tune

CHANGED = "model.layers.0.mlp.down_proj.weight"


def export(model_dir, folder):
    """model_dir written as folder/model.gguf: every test file gets the same name."""
    folder.mkdir()
    return fine_tune.export_gguf(model_dir, folder / "model.gguf", "f32")


def retrained_copy(model_dir, folder):
    """The same model with one weight changed, as a fine-tuned one is: same size, same GGUF header."""
    shutil.copytree(model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    weights[CHANGED] = weights[CHANGED] + 0.5
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def converted(folder):
    return load_file(f"{folder}/model.safetensors")[CHANGED]


@pytest.fixture(scope="module")
def two_files(exportable_model, tmp_path_factory):
    """A model and its retrained copy as GGUF files, exported once for these tests (each test copies them)."""
    model_dir, root = exportable_model("llama"), tmp_path_factory.mktemp("exports")
    return model_dir, export(model_dir, root / "A"), export(retrained_copy(model_dir, root / "retrained"), root / "B")


def copies(two_files, folder):
    """The two files, each as folder/A/model.gguf and folder/B/model.gguf: one name, two models."""
    _, *files = two_files
    for name, file in zip("AB", files):
        (folder / name).mkdir()
        shutil.copy(file, folder / name / "model.gguf")
    return str(folder / "A" / "model.gguf"), str(folder / "B" / "model.gguf")


def test_two_files_with_one_name_are_converted_to_their_own_folders(two_files, tmp_path, capsys):
    model_dir = two_files[0]
    original, retrained = copies(two_files, tmp_path)
    cache = tmp_path / "cache"

    folder_a = fine_tune.resolve_model(original, cache)
    folder_b = fine_tune.resolve_model(retrained, cache)

    assert folder_a != folder_b
    assert not torch.equal(converted(folder_a), converted(folder_b))
    source = load_file(f"{model_dir}/model.safetensors")[CHANGED]
    assert torch.allclose(converted(folder_a), source), "A's folder holds A's weights"
    assert capsys.readouterr().out.count("Converting model.gguf") == 2


def test_the_same_file_is_converted_once_and_a_changed_one_again(two_files, tmp_path, capsys):
    path, other = copies(two_files, tmp_path)
    cache = tmp_path / "cache"

    first = fine_tune.resolve_model(path, cache)
    assert fine_tune.resolve_model(path, cache) == first
    assert capsys.readouterr().out.count("Converting") == 1, "reused the second time"

    shutil.copy(other, path)  # replaced in place, under the same name
    assert fine_tune.resolve_model(path, cache) != first
    assert capsys.readouterr().out.count("Converting") == 1
