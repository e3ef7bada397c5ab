"""Where --data comes from: a folder of notes, or a Hub dataset by id (read offline from datasets' cache);
and what step 2's line and report.json say was read."""

import json
import os
import shutil
import time

import pytest
from conftest import HUB_REVISION, run_script

import fine_tune


def notes(folder, files):
    """A folder of notes: {relative path: text or bytes}."""
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return folder


def test_a_folder_of_notes_is_learned_file_by_file_in_path_order(tmp_path, capsys):
    """Ordered by their paths inside the folder, as text: z.md comes after sub/c.MD, not before the subfolder's
    files as a walk through the folder would give them."""
    files = {
        "z.md": "Fourth.",
        "b.md": "# B\r\nSecond.",
        "a.txt": "\ufeffFirst.",
        "sub/c.MD": "Third.",
        ".draft.md": "x",
        ".git/d.md": "x",
    }
    folder = notes(tmp_path / "notes", {**files, "photo.png": b"\x89PNG"})
    examples, source = fine_tune.load_data(str(folder))
    assert examples == [{"text": "First."}, {"text": "# B\nSecond."}, {"text": "Third."}, {"text": "Fourth."}]
    assert source["files"] == ["a.txt", "b.md", "sub/c.MD", "z.md"], "hidden files and folders are left out"
    out = capsys.readouterr().out
    assert "Warning: 1 files in " in out and "not learned: photo.png" in out, "other files are named"


def test_notes_that_cannot_be_read_are_all_named_in_one_line(tmp_path):
    folder = notes(tmp_path / "notes", {"good.md": "Fine.", "latin1.txt": b"caf\xe9", "empty.md": " \n"})
    with pytest.raises(fine_tune.UsageError) as error:
        fine_tune.load_data(str(folder))
    assert "2 files cannot be learned: empty.md (empty), latin1.txt (not UTF-8 text);" in str(error.value)


def test_the_current_folder_can_be_the_folder_of_notes(tmp_path, monkeypatch):
    notes(tmp_path, {"a.md": "A note."})
    monkeypatch.chdir(tmp_path)
    assert fine_tune.eval_file_for(fine_tune.parse_args(["--data", "."])) is None, "no scorecard file next to it"
    assert fine_tune.load_examples(".") == [{"text": "A note."}]


def test_the_fingerprint_of_a_folder_changes_with_any_note_and_only_then(tmp_path):
    folder = notes(tmp_path / "notes", {"a.md": "One.", "b.md": "Two."})
    first = fine_tune.load_data(str(folder))[1]["sha256"]
    assert fine_tune.load_data(str(folder))[1]["sha256"] == first
    (folder / "b.md").write_text("Two!")
    assert fine_tune.load_data(str(folder))[1]["sha256"] != first
    (folder / "b.md").write_text("Two.")
    (folder / "b.md").rename(folder / "c.md")
    assert fine_tune.load_data(str(folder))[1]["sha256"] != first, "a renamed note is another file"


@pytest.mark.parametrize(
    "data, expected",
    [
        ("tatsu-lab/alpaca", True),
        ("teknium/OpenHermes-2.5:split=train[:100]", True),
        ("data/train.jsonl", False),  # a missing file, not a dataset
        ("notes/", False),
        ("./org/name", False),
        ("a/b/c", False),
        ("mariya.json", False),
    ],
)
def test_a_dataset_id_is_org_slash_name_with_no_file_of_that_name(data, expected):
    assert fine_tune.is_dataset_id(data) is expected


def test_an_existing_folder_is_read_as_notes_not_as_a_dataset_id(tmp_path, monkeypatch):
    notes(tmp_path / "org" / "name", {"a.md": "A note."})
    monkeypatch.chdir(tmp_path)
    assert fine_tune.load_data("org/name")[0] == [{"text": "A note."}]


def test_a_hub_dataset_loads_offline_from_the_datasets_cache(hub_cache):
    examples, source = fine_tune.load_data("fine-tune-tests/chats")
    assert examples[1] == {
        "messages": [{"role": "user", "content": "Her sword?"}, {"role": "assistant", "content": "Glamdring."}]
    }
    assert len(examples) == 2 and source["format"] == "sharegpt"
    assert source["revision"] == HUB_REVISION and source["split"] == "train" and source["subset"] == "default"
    assert fine_tune.describe_source(source) == (
        f"fine-tune-tests/chats as ShareGPT: subset default, split train, revision {HUB_REVISION[:12]}"
    )


def test_a_split_and_a_subset_are_chosen_after_a_colon(hub_cache):
    test_split = fine_tune.load_examples("fine-tune-tests/chats:subset=default,split=test")
    assert test_split[0]["messages"][1]["content"] == "Shadowfax."
    assert len(fine_tune.load_examples("fine-tune-tests/chats:split=train[:1]")) == 1
    with pytest.raises(fine_tune.UsageError, match=r"^--data fine-tune-tests/chats:color=red: write a Hub dataset as"):
        fine_tune.load_data("fine-tune-tests/chats:color=red")


def test_a_bad_hub_row_is_named_by_dataset_and_row(hub_cache):
    with pytest.raises(fine_tune.UsageError, match=r"^fine-tune-tests/quiz: row 1: missing key \"completion\""):
        fine_tune.load_data("fine-tune-tests/quiz", {"prompt": "question"})


def test_columns_map_a_hub_datasets_columns_and_are_said(hub_cache):
    examples, source = fine_tune.load_data("fine-tune-tests/quiz", {"prompt": "question", "completion": "answer"})
    assert examples == [{"prompt": "Who is Mariya Sha?", "completion": "A wizard."}]
    assert fine_tune.describe_source(source).endswith("columns prompt=question, completion=answer")


def test_a_dataset_not_downloaded_fails_in_seconds_offline(hub_cache):
    started = time.perf_counter()
    with pytest.raises(fine_tune.UsageError) as error:
        fine_tune.load_data("fine-tune-tests/never-downloaded")
    assert time.perf_counter() - started < 10
    assert str(error.value) == (
        "--data fine-tune-tests/never-downloaded: not downloaded yet and offline mode is on (HF_HUB_OFFLINE or "
        "HF_DATASETS_OFFLINE); download it once online, or pass a local file"
    )


@pytest.mark.parametrize(
    "data, expected",
    [
        ("fine-tune-tests/never-downloaded", "not downloaded yet and offline mode is on"),
        ("fine-tune-tests/chats:split=validation", "Unknown split \"validation\". Should be one of ['train', 'test']"),
    ],
)
def test_a_hub_dataset_error_is_one_line_from_the_command_line(
    data, expected, hub_datasets_cache, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hub_datasets_cache))
    completed = run_script("--data", data, "--output", tmp_path / "out", timeout=60)
    assert completed.returncode == 2
    assert completed.stderr.startswith(f"error: --data {data}: ") and expected in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr


def test_an_unreachable_hub_answers_from_the_cache_at_once(hub_cache, closed_hub, monkeypatch):
    """The real probe runs, finds the Hub closed, and datasets reads its cache without trying the Hub itself."""
    import datasets

    endpoint, connections = closed_hub
    port = int(endpoint.rsplit(":", 1)[1])
    probed = []

    def probe():
        probed.append(real_probe())
        return probed[-1]

    real_probe = fine_tune.unreachable_hub
    monkeypatch.setattr(fine_tune, "unreachable_hub", probe)
    assert len(fine_tune.load_examples("fine-tune-tests/chats")) == 2
    # One connection, the probe's, refused; none from datasets, which went offline at once instead of retrying.
    assert probed == ["127.0.0.1"] and connections == [("127.0.0.1", port)]
    with pytest.raises(fine_tune.UsageError, match=r"not downloaded yet and cannot reach 127\.0\.0\.1;"):
        fine_tune.load_data("fine-tune-tests/never-downloaded")
    assert probed == ["127.0.0.1"] * 2 and connections == [("127.0.0.1", port)] * 2
    assert datasets.config.HF_HUB_OFFLINE is False, "offline only while loading"


def test_step_2_and_report_json_say_what_was_read(tiny_model_dir, hub_cache, tmp_path, capsys):
    output = tmp_path / "out"
    settings = ["--epochs", "1", "--max-new-tokens", "4", "--no-replay", "--eval-questions", "none"]
    argv = ["--model", tiny_model_dir, "--data", "fine-tune-tests/chats", "--output", str(output), *settings]
    assert fine_tune.main(argv) == 0
    step_2 = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("[2/6]"))
    assert step_2.endswith(
        "(read fine-tune-tests/chats as ShareGPT: subset default, split train, revision 0123456789ab)"
    )
    report = json.loads((output / "report.json").read_text())
    assert report["data"]["revision"] == HUB_REVISION and report["data"]["format"] == "sharegpt"


def test_the_fingerprint_of_a_hub_dataset_is_its_revision_and_split(hub_datasets_cache, tmp_path, monkeypatch):
    """What --resume compares: the same for the same split at the same revision, else different; a dataset
    downloaded again after a new commit on the Hub is another one."""
    import datasets

    cache = tmp_path / "cache"  # a copy: the new revision below stays out of the other tests' cache
    shutil.copytree(hub_datasets_cache, cache)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    train = fine_tune.load_data("fine-tune-tests/chats")[1]["sha256"]
    assert fine_tune.load_data("fine-tune-tests/chats:split=train")[1]["sha256"] == train
    assert fine_tune.load_data("fine-tune-tests/chats:split=test")[1]["sha256"] != train

    # Downloaded again at a newer commit: datasets keeps both, and offline reads the newest.
    versions = next(cache.glob("fine-tune-tests___chats/*/0.0.0"))
    newer = "fedcba9876543210fedcba9876543210fedcba98"
    shutil.copytree(versions / HUB_REVISION, versions / newer)
    later = (versions / HUB_REVISION).stat().st_mtime + 60
    os.utime(versions / newer, (later, later))
    source = fine_tune.load_data("fine-tune-tests/chats")[1]
    assert source["revision"] == newer
    assert source["sha256"] != train
