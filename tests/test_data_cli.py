"""`imgarena data inspect` / `data get`: reports, exit codes, one-line messages."""

from __future__ import annotations

import shutil

from _data_files import write_bad_files, write_class_folder
from imgarena.cli import main


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("imgarena: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_inspect_bad_paths_exit_2_with_one_line(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "nope")]) == 2
    assert "does not exist" in _one_line_error(capsys)
    (tmp_path / "file.txt").write_text("x")
    assert main(["data", "inspect", str(tmp_path / "file.txt")]) == 2
    assert "is a file" in _one_line_error(capsys)
    write_class_folder(tmp_path / "one", classes=("cat",), per_class=2)
    assert main(["data", "inspect", str(tmp_path / "one")]) == 2
    assert "at least 2 class" in _one_line_error(capsys)


def test_get_bad_name_and_bad_out(tmp_path, capsys):
    assert main(["data", "get", "mnist", "--out", str(tmp_path / "x")]) == 2
    assert "unknown built-in" in _one_line_error(capsys)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert main(["data", "get", "sample", "--out", str(tmp_path / "full")]) == 2
    assert "already exists and is not empty" in _one_line_error(capsys)


def test_inspect_reports_bad_files_imbalance_and_leaks(tmp_path, capsys):
    write_class_folder(tmp_path / "d" / "train", classes=("cat", "dog"), per_class=12)
    write_class_folder(tmp_path / "d" / "train", classes=("owl",), per_class=2, start=200)
    write_class_folder(tmp_path / "d" / "val", classes=("cat", "dog"), per_class=2, start=100)
    shutil.copy(tmp_path / "d" / "train" / "cat" / "cat_000.png", tmp_path / "d" / "val" / "cat" / "copy.png")
    write_bad_files(tmp_path / "d" / "train" / "dog")
    assert main(["data", "inspect", str(tmp_path / "d"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "classes: 3" in out and "12x12 (" in out and "L (" in out
    assert "truncated.jpg: truncated" in out and "empty.png: empty file" in out and "notes.jpg: not an image" in out
    assert "class imbalance" in out and "tiny classes" in out and "owl (2)" in out
    assert "identical files across splits" in out and "copy.png" in out


def test_get_sample_writes_a_folder_that_inspect_reads(tmp_path, capsys):
    out_dir = tmp_path / "sample"
    assert main(["data", "get", "sample", "--out", str(out_dir)]) == 0
    capsys.readouterr()
    assert len(list((out_dir / "train" / "Bag").glob("*.png"))) >= 200
    assert main(["data", "inspect", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "classes: 10" in out and "28x28" in out and "unreadable" not in out
