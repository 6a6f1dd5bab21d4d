"""The start of a `python -c` script that proves a code path never imports torch: any attempt to
import torch (or what pulls it in) fails loudly. Append the code under test."""

NO_TORCH = r"""
import json, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm"):
            raise ImportError("torch import attempted: " + name)

sys.meta_path.insert(0, NoTorch())
from imgarena.cli import main
"""
