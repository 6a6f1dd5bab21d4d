"""Data pipeline: sources (folder, CSV, built-ins) -> decoded uint8 cache -> batched loader.

`load_data`, `PreparedData` and `Split` are imported lazily so `imgarena.data.images` (used by the
torch-free ONNX predict path) can be imported without pulling in the rest.
"""

__all__ = ["load_data", "PreparedData", "Split"]


def __getattr__(name):
    if name in __all__:
        from imgarena.data import prepare

        return getattr(prepare, name)
    raise AttributeError(f"module 'imgarena.data' has no attribute {name!r}")
