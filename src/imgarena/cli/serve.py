"""`imgarena serve RUN_OR_ONNX`: an HTTP service (POST /predict, GET /health, GET /info, a page at /).

A `.onnx` export is served with onnxruntime only: nothing on that path imports torch.
"""

from __future__ import annotations

import os
import sys

from imgarena.cli.common import add_command

EXAMPLES = """
imgarena serve runs/rice-mixer_s16-0001                         # http://127.0.0.1:8000, PyTorch
imgarena serve runs/rice-mixer_s16-0001/export/mixer_s16.onnx   # torch-free (onnxruntime)
imgarena serve model.onnx --host 0.0.0.0 --port 9000 --token "$(cat token.txt)"
curl -F file=@cat.jpg -F file=@dog.png 'http://127.0.0.1:8000/predict?topk=2'
curl -F file=@cat.jpg 'http://127.0.0.1:8000/predict?min_prob=0.6'   # "unknown" below 0.6
curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg' http://127.0.0.1:8000/predict
"""

TOKEN_ENV = "IMGARENA_SERVE_TOKEN"


def register(sub) -> None:
    p = add_command(sub, "serve", "serve a trained run, checkpoint or exported .onnx over HTTP (with a drop-images page)",
                    EXAMPLES, run)
    p.add_argument("checkpoint", metavar="RUN_OR_ONNX", help="run folder, .safetensors checkpoint or .onnx export")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port, printed at start)")
    p.add_argument("--token", default=None,
                   help=f"require 'Authorization: Bearer TOKEN' on /predict and /info (default: ${TOKEN_ENV} if set)")
    p.add_argument("--topk", type=int, default=3, help="classes per image unless a request asks ?topk=N (default 3)")
    p.add_argument("--min-prob", type=float, default=None, metavar="P",
                   help="label an image 'unknown' when its top probability is below P, unless a request "
                        "asks ?min_prob= (default: off; `imgarena eval` prints the table to pick P)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--which", choices=["best", "last"], default="best", help="checkpoint of a run folder (default best)")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch", type=int, default=32, help="images per model call (default 32)")
    g.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="how long a request waits for others to share its batch (default 2 ms)")
    g.add_argument("--max-request-mb", type=float, default=20.0, help="request body limit in MB (default 20)")
    g.add_argument("--max-files", type=int, default=32, help="images per request (default 32)")
    g.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="width x height per image, checked before decoding (default 40,000,000)")
    g.add_argument("--timeout", type=float, default=30.0,
                   help="seconds a client may take to send its request headers, and its body (default 30)")
    g.add_argument("--max-connections", type=int, default=64, help="open connections; more get 503 (default 64)")
    g.add_argument("--workers", type=int, default=0, help="image decoding threads (default: min(8, cores))")
    g.add_argument("--no-access-log", action="store_true", help="do not log one line per request")


def run(args) -> int:
    from imgarena.cli.common import flags_for
    from imgarena.config import from_dict
    from imgarena.errors import UserError

    try:
        from imgarena.serve import ServeConfig, load_backend, serve
    except ImportError as e:
        raise UserError(f"imgarena serve needs {e.name}: pip install starlette uvicorn python-multipart") from None

    d = {k: getattr(args, k) for k in ("host", "port", "topk", "min_prob", "device", "which", "max_batch", "max_wait_ms",
                                       "max_request_mb", "max_files", "max_pixels", "timeout", "max_connections",
                                       "workers")}
    d["source"] = args.checkpoint
    d["token"] = args.token if args.token is not None else (os.environ.get(TOKEN_ENV) or None)
    cfg = from_dict(ServeConfig, d, flags={**flags_for(d), "source": "RUN_OR_ONNX"})
    backend = load_backend(cfg.source, device=cfg.device, which=cfg.which)

    def ready(url: str) -> None:
        model = backend.info()["model"]["name"]
        print(f"imgarena serve: {model} ({len(backend.class_names)} classes, {backend.kind}) on {url}  "
              f"- page {url}/ , POST {url}/predict , GET {url}/info{' (token required)' if cfg.token else ''}", flush=True)

    try:
        serve(cfg, backend, on_ready=ready, access_log=not args.no_access_log)
    except KeyboardInterrupt:  # uvicorn has shut down gracefully, then re-raises Ctrl-C: the normal way to stop
        print("imgarena serve: stopped", file=sys.stderr)
    return 0
