"""`imgarena serve`: the real server on a loopback port, for the ONNX and the PyTorch backend. Rows equal
`imgarena predict`'s; bad uploads get a 400 naming the file and the server keeps serving; token,
origin and host checks; slow clients are cut off; concurrent requests share batches; the ONNX
backend never imports torch."""

import json
import shutil
import socket
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgarena.cli import main
from imgarena.config import PredictConfig
from imgarena.predict import run_predict
from predict_helpers import write_images
from serve_helpers import Server, train_tiny
from _no_torch import NO_TORCH

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from imgarena.data.builtin import load_sample

    root = tmp_path_factory.mktemp("imgs")
    made = write_images(root)
    for i, a in enumerate(load_sample().parts["test"][0][:4]):  # real Fashion-MNIST images
        Image.fromarray(a[0], "L").save(root / f"sample{i}.png")
        made["good"].append(str(root / f"sample{i}.png"))
    made["root"] = root
    return made


@pytest.fixture(scope="module")
def onnx_server(model, tmp_path_factory):
    # small limits so each one can be hit cheaply
    srv = Server([model[1], "--max-request-mb", "0.3", "--max-files", "4", "--max-pixels", "1000000",
                  "--timeout", "2"], tmp_path_factory.mktemp("onnx_server"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def torch_server(model, tmp_path_factory):
    # a long batching wait: concurrent requests surely meet in one batch
    srv = Server([model[0], "--device", "cpu", "--max-wait-ms", "300", "--token", TOKEN],
                 tmp_path_factory.mktemp("torch_server"), headers={"Authorization": f"Bearer {TOKEN}"})
    yield srv
    srv.stop()


def _bytes(path) -> bytes:
    return Path(path).read_bytes()


def _ctype(path) -> str:
    return "image/jpeg" if str(path).endswith(".jpg") else "image/png"


def _expected(checkpoint, paths, topk=3) -> dict:
    rows = run_predict(PredictConfig(checkpoint=str(checkpoint), inputs=list(map(str, paths)), topk=topk, device="cpu"),
                       progress=False)
    return {Path(r.path).name: r.as_dict() for r in rows}


def _assert_same_rows(got: list, want: dict):
    for row in got:
        ref = want[row["path"]]
        assert set(row) == set(ref) == {"path", "label", "prob", "topk", "error"}
        assert row["error"] is None and row["label"] == ref["label"]
        assert [t["label"] for t in row["topk"]] == [t["label"] for t in ref["topk"]]
        np.testing.assert_allclose([t["prob"] for t in row["topk"]], [t["prob"] for t in ref["topk"]], atol=1e-5)
        assert row["prob"] == row["topk"][0]["prob"]


def _good_request_works(srv, files):
    status, _, data = srv.predict([(Path(files["good"][0]).name, _bytes(files["good"][0]), "image/png")])
    assert status == 200, data
    assert data["rows"][0]["label"]


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_rows_equal_predict_json(backend, model, files, onnx_server, torch_server):
    srv, checkpoint = (onnx_server, model[1]) if backend == "onnx" else (torch_server, model[0])
    good = files["good"][:4]  # --max-files 4 on the ONNX server
    want = _expected(checkpoint, files["good"], topk=2)
    status, headers, data = srv.predict([(Path(p).name, _bytes(p), _ctype(p)) for p in good], query="?topk=2")
    assert status == 200, data
    assert data["backend"] == backend and data["model"] == "mlp"
    assert [r["path"] for r in data["rows"]] == [Path(p).name for p in good]  # upload order
    assert all(len(r["topk"]) == 2 for r in data["rows"])
    _assert_same_rows(data["rows"], want)
    assert headers["cache-control"] == "no-store"
    # the rest, one raw image body each (topk from the server default, 3)
    want3 = _expected(checkpoint, files["good"])
    for p in files["good"][4:]:
        status, _, data = srv.call("POST", "/predict", _bytes(p), {"Content-Type": _ctype(p), "X-Filename": Path(p).name})
        assert status == 200, data
        assert len(data["rows"]) == 1 and len(data["rows"][0]["topk"]) == 3
        _assert_same_rows(data["rows"], want3)


def test_health_and_info_describe_the_model(model, onnx_server):
    status, _, health = onnx_server.call("GET", "/health")
    assert status == 200 and health == {"status": "ok", "backend": "onnx", "auth": False}
    status, _, info = onnx_server.call("GET", "/info")
    side = json.loads(Path(str(model[1]) + ".json").read_text())
    assert status == 200
    assert info["class_names"] == side["class_names"] and info["num_classes"] == 10
    assert info["preprocessing"] == side["preprocessing"]
    assert info["model"]["name"] == "mlp" and info["backend"] == "onnx" and info["file"] == "mlp.onnx"
    # every trained run is temperature-calibrated on its val split; the export sidecar carries it
    assert info["calibration"] == {"method": "temperature", "temperature": side["calibration"]["temperature"]}
    assert info["limits"]["max_files"] == 4 and info["limits"]["max_pixels"] == 1_000_000
    assert info["limits"]["max_request_bytes"] == 300_000


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (a decompression bomb's header) and one tiny IDAT."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_bad_uploads_get_400_naming_the_file_and_the_server_keeps_serving(onnx_server, files, tmp_path):
    srv = onnx_server
    big = tmp_path / "big.png"
    Image.new("L", (1200, 1000), 128).save(big)  # 1.2 Mpx: over --max-pixels 1e6, a few KB on the wire
    truncated = next(p for p in files["bad"] if p.endswith("truncated.jpg"))
    corrupt = next(p for p in files["bad"] if p.endswith("corrupt.png"))
    cases = [  # (file name, bytes, content type, what the error says)
        ("notes.txt", b"just some text\n", "text/plain", "not an image"),
        ("truncated.jpg", _bytes(truncated), "image/jpeg", "truncated"),
        ("corrupt.png", _bytes(corrupt), "image/png", "corrupt.png:"),
        ("empty.png", b"", "image/png", "empty file"),
        ("bomb.png", _png_header(30000, 30000), "image/png", "decompression bomb"),
        ("big.png", _bytes(big), "image/png", "--max-pixels"),
    ]
    for name, data, ctype, says in cases:
        status, _, body = srv.predict([(name, data, ctype)])
        assert status == 400, (name, body)
        assert body["file"] == name and body["error"].startswith(name + ": ") and says in body["error"], body
        _good_request_works(srv, files)

    # one bad file among good ones: the whole request is refused, naming it
    good = files["good"][0]
    status, _, body = srv.predict([(Path(good).name, _bytes(good), "image/png"), ("notes.txt", b"hi", "text/plain")])
    assert status == 400 and body["file"] == "notes.txt" and [e["file"] for e in body["errors"]] == ["notes.txt"]
    # the same file as a raw body names what X-Filename said
    status, _, body = srv.call("POST", "/predict", b"", {"Content-Type": "image/png", "X-Filename": "zero.png"})
    assert status == 400 and body["file"] == "zero.png" and "empty file" in body["error"]

    oversized = b"\0" * 400_000  # over --max-request-mb 0.3
    request_errors = [
        srv.call("POST", "/predict", oversized, {"Content-Type": "image/png"}),  # Content-Length says so
        srv.call("POST", "/predict", oversized, {"Content-Type": "image/png"}, chunked=True),  # counted while reading
        srv.call("POST", "/predict", b"hello", {"Content-Type": "text/plain"}),  # wrong content type
        srv.call("POST", "/predict", b'{"image": "x"}', {"Content-Type": "application/json"}),
        srv.call("POST", "/predict", _bytes(good)),  # no content type at all
        srv.predict([(f"{i}.png", _bytes(good), "image/png") for i in range(5)]),  # over --max-files 4
        srv.predict([], fields={"note": "x"}),  # a form without files
        srv.predict([(Path(good).name, _bytes(good), "image/png")], query="?topk=zero"),
        srv.call("POST", "/predict", b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\nab",
                 {"Content-Type": "multipart/form-data; boundary=x"}),  # cut short: no closing boundary
    ]
    for status, _, body in request_errors:
        assert status == 400 and isinstance(body, dict) and body["error"], body
        _good_request_works(srv, files)
    assert "limit of 300000 bytes" in request_errors[0][2]["error"] and "limit" in request_errors[1][2]["error"]
    assert "Content-Type" in request_errors[2][2]["error"] and "more than 4 files" in request_errors[5][2]["error"]

    status, _, body = srv.call("GET", "/nope")
    assert status == 404 and "error" in body
    status, _, body = srv.call("GET", "/predict")
    assert status == 405 and "error" in body
    assert srv.proc.poll() is None


def test_token_origin_and_host_checks(torch_server, files):
    srv = torch_server
    img = [(Path(files["good"][0]).name, _bytes(files["good"][0]), "image/png")]
    assert srv.call("GET", "/health", headers={"Authorization": ""})[2]["auth"] is True  # health needs no token
    for auth in ("", "Bearer wrong", f"Basic {TOKEN}"):
        status, headers, body = srv.predict(img, headers={"Authorization": auth})
        assert status == 401 and "token" in body["error"] and headers["www-authenticate"] == "Bearer"
        assert srv.call("GET", "/info", headers={"Authorization": auth})[0] == 401
    assert srv.predict(img)[0] == 200 and srv.call("GET", "/info")[0] == 200
    # another site's page in the user's browser may not use the model...
    status, _, body = srv.predict(img, headers={"Origin": "http://evil.example"})
    assert status == 403 and "cross-origin" in body["error"]
    assert srv.predict(img, headers={"Origin": srv.url})[0] == 200  # ...the page at / may
    # DNS rebinding: a loopback server answers only to loopback host names
    assert srv.call("GET", "/health", headers={"Host": "evil.example"})[0] == 400


def test_concurrent_requests_share_batches(torch_server, model, files):
    srv = torch_server
    before = srv.call("GET", "/info")[2]["stats"]
    status, _, data = srv.predict([(Path(p).name, _bytes(p), _ctype(p)) for p in files["good"][:6]])
    assert status == 200
    after = srv.call("GET", "/info")[2]["stats"]
    assert after["images"] - before["images"] == 6 and after["batches"] - before["batches"] == 1  # one request, one batch

    paths = files["good"][:8]
    results, barrier = [None] * len(paths), threading.Barrier(len(paths))

    def client(i):
        barrier.wait()
        results[i] = srv.predict([(Path(paths[i]).name, _bytes(paths[i]), _ctype(paths[i]))])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None and r[0] == 200 for r in results), results
    _assert_same_rows([r[2]["rows"][0] for r in results], _expected(model[0], paths))
    final = srv.call("GET", "/info")[2]["stats"]
    assert final["images"] - after["images"] == 8
    assert final["batches"] - after["batches"] < 8  # 8 requests within the 300 ms window: fewer model calls


def test_slow_clients_are_cut_off(onnx_server, files):
    srv = onnx_server  # --timeout 2
    # headers sent part way, then nothing: the connection is closed
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        t0 = time.monotonic()
        assert s.recv(1024) == b""
        assert time.monotonic() - t0 < 25
    # headers complete, body promised but never finished: 408 with a JSON error
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
                  + b"\x89PNG\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            part = s.recv(4096)
            if not part:
                break
            reply += part
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"].startswith("request body not received")
    _good_request_works(srv, files)


_TORCH_FREE = NO_TORCH + r"""
rc = main(sys.argv[1:])
print("TORCH_IMPORTED", "torch" in sys.modules, "RC", rc, flush=True)
"""


def test_onnx_backend_never_imports_torch(model, files, tmp_path):
    srv = Server([model[1]], tmp_path, argv_prefix=[sys.executable, "-c", _TORCH_FREE])
    try:
        p = files["good"][0]
        status, _, data = srv.predict([(Path(p).name, _bytes(p), "image/png")])
        assert status == 200, (data, srv.log())
        assert srv.call("GET", "/")[0] == 200 and srv.call("GET", "/info")[0] == 200
    finally:
        out = srv.stop()
    assert "TORCH_IMPORTED False RC 0" in out, srv.log()


def test_calibration_temperature_divides_logits(model, files, tmp_path):
    from imgarena.serve import load_backend
    from imgarena.serve.uploads import decode_upload

    onnx = tmp_path / "cal.onnx"
    shutil.copy(model[1], onnx)
    side = json.loads(Path(str(model[1]) + ".json").read_text())
    (tmp_path / "cal.onnx.json").write_text(json.dumps({**side, "calibration": {"method": "temperature", "temperature": 2.0}}))
    backend = load_backend(onnx)
    assert backend.info()["calibration"] == {"method": "temperature", "temperature": 2.0}
    paths = files["good"][:3]
    x = np.stack([decode_upload(_bytes(p), backend.preprocessing, max_pixels=10**7) for p in paths])
    got = backend.probabilities(backend.logits_fn(x))
    plain = run_predict(PredictConfig(checkpoint=str(model[1]), inputs=paths, topk=10, calibrated=False),
                        progress=False)
    for row, g in zip(plain, got):  # softmax(log p / T) == softmax(logits / T)
        p = np.array([dict(row.topk)[c] for c in backend.class_names], dtype=np.float64)
        want = np.exp(np.log(p) / 2)
        np.testing.assert_allclose(g, want / want.sum(), atol=1e-5)
    (tmp_path / "cal.onnx.json").write_text(json.dumps({**side, "temperature": -1}))
    assert main(["serve", str(onnx)]) == 2


def test_cli_user_errors_exit_2(model, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing.onnx")]) == 2
    assert main(["serve", str(model[1]), "--port", "70000"]) == 2
    assert main(["serve", str(model[1]), "--max-files", "0"]) == 2
    err = capsys.readouterr().err
    assert "missing.onnx.json not found" in err or "missing.onnx not found" in err
    assert "--port" in err and "--max-files" in err
