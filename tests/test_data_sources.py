"""Where --data comes from: a folder of notes."""

import pytest

import fine_tune


def notes(folder, files):
    """A folder of notes: {relative path: text or bytes}."""
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return folder


def test_a_folder_of_notes_is_learned_file_by_file_in_path_order(tmp_path, capsys):
    files = {
        "b.md": "# B\r\nSecond.",
        "a.txt": "\ufeffFirst.",
        "sub/c.MD": "Third.",
        ".draft.md": "x",
        ".git/d.md": "x",
    }
    folder = notes(tmp_path / "notes", {**files, "photo.png": b"\x89PNG"})
    examples, source = fine_tune.load_data(str(folder))
    assert examples == [{"text": "First."}, {"text": "# B\nSecond."}, {"text": "Third."}]
    assert source["files"] == ["a.txt", "b.md", "sub/c.MD"], "hidden files and folders are left out"
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
