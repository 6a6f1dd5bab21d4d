"""How fast is `imgarena serve`, and what does HTTP cost next to `imgarena predict`?

For the ONNX and the PyTorch backend, the real server runs in its own process on 127.0.0.1 and
1, 8 and 32 concurrent clients (threads, one keep-alive connection each) POST one image per
request, round-robin over the same PNGs. Reported per level: requests (= images) per second,
p50/p95/p99 latency and errors (which must be zero). Then `imgarena.predict.run_predict` on the
same files gives the batch-job images/s to compare with. Every level stops at --requests requests
or --seconds seconds, whichever comes first; nothing leaves the loopback interface.

    python benchmarks/serve.py              # mlp, 1,000 Fashion-MNIST PNGs, 2,000 requests per level
    python benchmarks/serve.py --quick      # a smoke run
    python benchmarks/serve.py --model mixer_t4 --img-size 28

Weights are untrained: speed does not depend on their values. The clients share the machine
with the server, so on a small machine the numbers include the clients' own CPU time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

FMNIST_TEST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
URL_LINE = re.compile(r"on http://127\.0\.0\.1:(\d+)")


def write_pngs(folder: Path, n: int) -> list[str]:
    """n 28x28 grayscale PNGs: Fashion-MNIST test images when installed, else the embedded sample."""
    from PIL import Image

    if os.path.exists(FMNIST_TEST):
        from imgarena.data.builtin import read_idx

        imgs = read_idx(FMNIST_TEST)
    else:
        from imgarena.data.builtin import load_sample

        imgs = load_sample().parts["test"][0][:, 0]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i:05d}.png"
        Image.fromarray(imgs[i % len(imgs)], "L").save(p)
        paths.append(str(p))
    return paths


def make_model(root: Path, model_name: str, img_size: int, classes: int = 10) -> tuple[Path, Path]:
    """(run folder with best.safetensors, its ONNX export with a dynamic batch)."""
    import torch

    from imgarena.checkpoint import save_checkpoint
    from imgarena.config import ExportConfig
    from imgarena.export import run_export
    from imgarena.models import create_model

    torch.manual_seed(0)
    m = create_model(model_name, num_classes=classes, in_chans=1, img_size=img_size)
    meta = {"model": {"name": m.model_name, "kwargs": m.model_kwargs}, "num_classes": classes,
            "class_names": [f"class{i}" for i in range(classes)],
            "preprocessing": {"img_size": img_size, "channels": 1, "resize": "squash", "mean": [0.286], "std": [0.353]},
            "metrics": {}, "epoch": 0}
    run = root / "run"
    save_checkpoint(run / "best.safetensors", m, meta)
    res = run_export(ExportConfig(checkpoint=str(run), dynamic_batch=True, out=str(root / f"{model_name}.onnx")))
    if not res.parity.ok:
        raise SystemExit(res.summary())
    return run, Path(res.path)


class ServerProcess:
    def __init__(self, source: Path, log_dir: Path, extra: list[str]):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out = log_dir / "server.out"
        cmd = [sys.executable, "-m", "imgarena", "serve", str(source), "--host", "127.0.0.1", "--port", "0",
               "--no-access-log", "--device", "cpu", *extra]
        with open(self.out, "wb") as o, open(log_dir / "server.err", "wb") as e:
            self.proc = subprocess.Popen(cmd, stdout=o, stderr=e, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not (m := URL_LINE.search(self.out.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"server did not start: {(log_dir / 'server.err').read_text()[-2000:]}")
            time.sleep(0.1)
        self.port = int(m.group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Connection(http.client.HTTPConnection):
    """http.client sends headers and body in two writes: without TCP_NODELAY, Nagle's algorithm and
    the server's delayed ACK add ~40 ms to every request (curl and browsers set it too)."""

    def connect(self):
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def post(conn: http.client.HTTPConnection, data: bytes, name: str) -> dict:
    conn.request("POST", "/predict", body=data, headers={"Content-Type": "image/png", "X-Filename": name})
    r = conn.getresponse()
    body = r.read()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {body[:200]!r}")
    return json.loads(body)


def load_level(port: int, images: list[tuple[str, bytes]], clients: int, max_requests: int, seconds: float) -> dict:
    """`clients` threads, one keep-alive connection each, until max_requests are sent or time is up."""
    lock = threading.Lock()
    state = {"next": 0}
    latencies: list[float] = []
    errors: list[str] = []
    stop_at = time.monotonic() + seconds
    start = threading.Barrier(clients + 1)

    def client() -> None:
        conn = Connection("127.0.0.1", port, timeout=60)
        mine = []
        start.wait()
        while time.monotonic() < stop_at:
            with lock:
                i = state["next"]
                if i >= max_requests:
                    break
                state["next"] = i + 1
            name, data = images[i % len(images)]
            t0 = time.perf_counter()
            try:
                post(conn, data, name)
            except Exception as e:  # counted, and the connection rebuilt
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = Connection("127.0.0.1", port, timeout=60)
                continue
            mine.append(time.perf_counter() - t0)
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "first_error": errors[0] if errors else None,
            "seconds": wall, "rps": len(latencies) / wall, "p50": float(np.percentile(ms, 50)),
            "p95": float(np.percentile(ms, 95)), "p99": float(np.percentile(ms, 99))}


def server_stats(port: int) -> dict:
    conn = Connection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/info")
    stats = json.loads(conn.getresponse().read())["stats"]
    conn.close()
    return stats


def predict_images_per_s(source: Path, paths: list[str], repeats: int) -> tuple[float, dict]:
    from imgarena.config import PredictConfig
    from imgarena.predict import run_predict

    cfg = PredictConfig(checkpoint=str(source), inputs=paths, device="cpu")
    run_predict(cfg, progress=False)  # warm: model load, page cache
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        rows = run_predict(cfg, progress=False)
        best = min(best, time.perf_counter() - t0)
    return len(paths) / best, {Path(r.path).name: r.label for r in rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--img-size", type=int, default=28)
    ap.add_argument("--images", type=int, default=1000, help="distinct PNGs sent round-robin (default 1000)")
    ap.add_argument("--requests", type=int, default=2000, help="requests per concurrency level at most (default 2000)")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds per concurrency level at most (default 20)")
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels (default 1,8,32)")
    ap.add_argument("--backends", default="onnx,torch")
    ap.add_argument("--quick", action="store_true", help="200 images, 300 requests, 5 s per level")
    ap.add_argument("--serve-args", default="", help="extra `imgarena serve` options, e.g. '--max-wait-ms 5'")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.requests, args.seconds = 200, 300, 5.0
    levels = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory(prefix="imgarena-serve-bench-") as tmp:
        root = Path(tmp)
        paths = write_pngs(root / "imgs", args.images)
        images = [(Path(p).name, Path(p).read_bytes()) for p in paths]
        run, onnx = make_model(root, args.model, args.img_size)
        sources = {"onnx": onnx, "torch": run}
        print(f"# imgarena serve: {args.model} {args.img_size}px, {len(paths)} PNGs, one image per request, "
              f"<= {args.requests} requests or {args.seconds:g} s per level, {os.cpu_count()} CPUs, "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
        print(f"{'backend':<8} {'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>8} {'p50 ms':>7} {'p95 ms':>7} "
              f"{'p99 ms':>7} {'img/batch':>9}")
        failed = False
        for name in args.backends.split(","):
            srv = ServerProcess(sources[name], root / f"log-{name}", args.serve_args.split())
            try:
                conn = Connection("127.0.0.1", srv.port, timeout=60)
                served = {}
                for n, data in images[:50]:  # warm-up, and labels to check against predict
                    served[n] = post(conn, data, n)["rows"][0]["label"]
                rtt = []
                for _ in range(100):  # what a request costs without the model: the machine's floor
                    t0 = time.perf_counter()
                    conn.request("GET", "/health")
                    conn.getresponse().read()
                    rtt.append(time.perf_counter() - t0)
                conn.close()
                print(f"{name:<8} GET /health, 1 client: p50 {np.percentile(rtt, 50) * 1000:.2f} ms "
                      "(HTTP round trip without decoding or the model)", flush=True)
                for c in levels:
                    before = server_stats(srv.port)
                    r = load_level(srv.port, images, c, args.requests, args.seconds)
                    after = server_stats(srv.port)
                    per_batch = (after["images"] - before["images"]) / max(1, after["batches"] - before["batches"])
                    failed |= r["errors"] > 0
                    print(f"{name:<8} {c:>7} {r['requests']:>8} {r['errors']:>6} {r['rps']:>8.0f} {r['p50']:>7.2f} "
                          f"{r['p95']:>7.2f} {r['p99']:>7.2f} {per_batch:>9.1f}"
                          + (f"   first error: {r['first_error']}" if r["errors"] else ""), flush=True)
            finally:
                srv.stop()
            ips, labels = predict_images_per_s(sources[name], paths, repeats=1 if args.quick else 3)
            agree = sum(labels[n] == lab for n, lab in served.items())
            print(f"{name:<8} predict  {len(paths)} files: {ips:.0f} images/s (a batch job, no HTTP); "
                  f"top-1 agrees with the server on {agree}/{len(served)}", flush=True)
            failed |= agree != len(served)
        if failed:
            print("FAILED: errors under load or labels that differ from predict", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
