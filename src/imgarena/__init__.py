"""imgarena: train image classifiers on your own folder of images and pit architectures against each other.

The top-level import stays light (no torch) so that `imgarena predict model.onnx` runs with only
onnxruntime, numpy and Pillow. `load`, `train` and `compare` are imported on first use.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load", "train", "compare"]



def __getattr__(name):
    if name in ("load", "train", "compare"):
        from imgarena import api

        return getattr(api, name)
    raise AttributeError(f"module 'imgarena' has no attribute {name!r}")
