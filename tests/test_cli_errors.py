"""How `imgarena` ends: user errors as one line (exit 2), bugs as bugs (one line + a saved traceback,
exit 1), out of memory as advice, a closed output pipe quietly."""

import subprocess
import sys
from pathlib import Path

import imgarena.cli.models as models_cmd
from imgarena.cli import main


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_a_bug_is_reported_as_a_bug_with_its_traceback_saved(monkeypatch, capsys, tmp_path):
    def broken(pattern, family=None):
        return {}["no such key"]  # a real KeyError deep in a command

    monkeypatch.setattr(models_cmd, "run_list", broken)
    monkeypatch.setenv("IMGARENA_CACHE", str(tmp_path / "cache"))
    assert main(["models"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("imgarena: internal error: KeyError: 'no such key'") and "this is a bug" in line
    assert "Traceback" not in line and "error: error" not in line
    log = Path(line.rsplit("the traceback is in ", 1)[1])
    assert log.parent == tmp_path / "cache" / "logs"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in broken" in text and "'models'" in text


def test_the_traceback_goes_to_the_temp_folder_when_the_cache_is_unwritable(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("IMGARENA_CACHE", str(blocker))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.setattr(models_cmd, "run_list", lambda *a, **k: 1 / 0)
    assert main(["models"]) == 1
    line = _one_line(capsys.readouterr().err)
    log = Path(line.rsplit("the traceback is in ", 1)[1])
    assert log.parent == tmp_path / "tmp" and "ZeroDivisionError" in log.read_text()


def test_out_of_memory_is_advice_not_a_bug(monkeypatch, capsys):
    def hungry(*a, **k):
        raise MemoryError

    monkeypatch.setattr(models_cmd, "run_list", hungry)
    assert main(["models"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "out of memory" in line and "--batch-size" in line and "bug" not in line


def test_user_errors_stay_one_line_exit_2(capsys):
    assert main(["models", "summary"]) == 2
    assert _one_line(capsys.readouterr().err).startswith("imgarena: error: ")


def test_closed_output_pipe_is_quiet():
    """`imgarena models | head -1`: the reader goes away; no BrokenPipeError traceback, exit 141."""
    p = subprocess.Popen([sys.executable, "-m", "imgarena", "models", "mlp*"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # before the table is printed: the write gets EPIPE
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141 and err == "", err
