import subprocess
import sys

import pytest

from imgarena.cli import main


def test_help_lists_only_implemented_commands(capsys):
    import argparse
    import importlib

    from imgarena.cli import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    implemented = {n for n in COMMANDS if hasattr(importlib.import_module(f"imgarena.cli.{n}"), "register")}
    assert set(sub.choices) == implemented
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in implemented:
        assert name in out


def test_python_dash_m_runs():
    r = subprocess.run([sys.executable, "-m", "imgarena", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "imgarena" in r.stdout


def test_no_command_exits_2(capsys):
    assert main([]) == 2


def test_top_level_import_does_not_import_torch():
    code = "import sys, imgarena; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
