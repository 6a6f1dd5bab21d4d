"""Shared by the `imgarena serve` tests: a tiny trained model (+ its ONNX export), the real server in a
subprocess on a loopback port, and a stdlib HTTP client for it."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

START_TIMEOUT = 120  # s: the server imports, loads the model and prints its URL
URL_LINE = re.compile(r"on (http://127\.0\.0\.1:(\d+))")


def train_tiny(root: Path) -> tuple[Path, Path]:
    """(run folder, exported .onnx): `mlp` trained 1 epoch on 200 images of the built-in sample at 16 px."""
    import imgarena
    from imgarena.config import ExportConfig
    from imgarena.export import run_export

    summary = imgarena.train("sample", "mlp", epochs=1, img_size=16, subset=200, device="cpu",
                             out_dir=str(root / "runs"), progress=False)
    run = Path(summary["run_dir"])
    res = run_export(ExportConfig(checkpoint=str(run), dynamic_batch=True, out=str(root / "mlp.onnx")))
    assert res.parity.ok, res.summary()
    return run, Path(res.path)


def multipart(files, fields=None) -> tuple[bytes, str]:
    """(body, Content-Type) of a multipart/form-data request; files: [(filename, bytes, content type)]."""
    boundary = uuid.uuid4().hex
    out = bytearray()
    for name, value in (fields or {}).items():
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").encode()
    for filename, data, ctype in files:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
                f"Content-Type: {ctype}\r\n\r\n").encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


class Connection(http.client.HTTPConnection):
    """TCP_NODELAY, as curl and browsers set it: http.client writes headers and body separately, and
    Nagle + delayed ACK would add ~40 ms to each request."""

    def connect(self):
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Server:
    """`imgarena serve ...` as a real subprocess on 127.0.0.1 (port 0: the OS picks a free one)."""

    def __init__(self, args, tmp: Path, *, headers=None, argv_prefix=None, env=None):
        self.out, self.err = tmp / "server.out", tmp / "server.err"
        cmd = (argv_prefix or [sys.executable, "-m", "imgarena"]) + ["serve", *map(str, args), "--port", "0"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "IMGARENA_PROGRESS": "0", **(env or {})}
        # files, not pipes: a server whose log fills an unread pipe would block
        with open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.proc = subprocess.Popen(cmd, stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=env)
        self.headers = dict(headers or {})
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            m = URL_LINE.search(self.out.read_text())
            if m:
                self.url, self.port = m.group(1), int(m.group(2))
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.out.read_text() + self.err.read_text()[-4000:]

    def stop(self) -> str:
        """Ctrl-C (uvicorn shuts down gracefully); returns what the process printed to stdout."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.out.read_text()

    def connection(self, timeout: float = 60) -> http.client.HTTPConnection:
        return Connection("127.0.0.1", self.port, timeout=timeout)

    def call(self, method: str, path: str, body=None, headers=None, *, chunked: bool = False):
        """(status, response headers, parsed JSON or raw bytes)."""
        conn = self.connection()
        try:
            hdrs = {**self.headers, **(headers or {})}
            if chunked:
                conn.request(method, path, body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                             headers=hdrs, encode_chunked=True)
            else:
                conn.request(method, path, body=body, headers=hdrs)
            r = conn.getresponse()
            data = r.read()
            rh = {k.lower(): v for k, v in r.getheaders()}
        finally:
            conn.close()
        return r.status, rh, json.loads(data) if rh.get("content-type", "").startswith("application/json") else data

    def predict(self, files, *, query: str = "", fields=None, headers=None):
        body, ctype = multipart(files, fields)
        return self.call("POST", "/predict" + query, body, {"Content-Type": ctype, **(headers or {})})
