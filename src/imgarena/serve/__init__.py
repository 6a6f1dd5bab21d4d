"""`imgarena serve`: the trained model as a small HTTP service (Starlette on uvicorn).

An exported `.onnx` is served with onnxruntime + numpy + Pillow only (torch is never imported);
a run folder or checkpoint with PyTorch. See `imgarena.serve.app` for the endpoints and limits.
"""

from imgarena.serve.app import ServeConfig, create_app, serve
from imgarena.serve.backend import Backend, MicroBatcher, load_backend

__all__ = ["Backend", "MicroBatcher", "ServeConfig", "create_app", "load_backend", "serve"]
