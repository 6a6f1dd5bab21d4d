"""Shared fixtures. Tests run on CPU with few threads so they are fast and deterministic."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("IMGARENA_PROGRESS", "0")


@pytest.fixture(autouse=True)
def _isolate_cache(tmp_path_factory, monkeypatch):
    # Each test session gets its own decoded-image cache; never the user's ~/.cache.
    monkeypatch.setenv("IMGARENA_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:
        return
    # OMP_NUM_THREADS=1 lets several test runs share the machine; default: every core.
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(os.cpu_count() or 1)
