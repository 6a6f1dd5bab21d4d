"""The HTTP service of `imgarena serve`: a Starlette app run by uvicorn.

Endpoints: POST /predict (multipart files or one raw image body -> the rows `imgarena predict
--format json` writes), GET /health, GET /info (model, classes, preprocessing, calibration,
limits), and a drop-images page at /. Safe by default: loopback bind, optional bearer token,
same-origin only, limits on body bytes, files per request and pixels per image, deadlines on
receiving headers and bodies, and uploads kept in memory only.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import socket
import sys
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit

from imgarena.config import CHECKPOINTS, DEVICE_RULE, Validated, opt
from imgarena.data.images import BadImage
from imgarena.errors import UserError
from imgarena.serve.backend import Backend, MicroBatcher
from imgarena.serve.uploads import UploadError, decode_upload, uploads_from_body

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src blob: data:; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
ASSETS = {"/": ("index.html", "text/html; charset=utf-8"), "/page.js": ("page.js", "text/javascript; charset=utf-8"),
          "/page.css": ("page.css", "text/css; charset=utf-8")}


@dataclass
class ServeConfig(Validated):
    """What `imgarena serve` needs."""

    source: str = ""  # run folder, .safetensors checkpoint, or an exported .onnx (torch-free)
    host: str = opt("127.0.0.1", nonempty=True)  # loopback unless told otherwise
    port: int = opt(8000, ge=0, le=65535)  # 0: any free port (printed at start)
    token: str | None = opt(None, nonempty=True)  # required as "Authorization: Bearer TOKEN" on /predict and /info
    topk: int = opt(3, ge=1)  # default classes per image; ?topk=N overrides per request
    min_prob: float | None = opt(None, ge=0, le=1)  # default: label "unknown" below it; ?min_prob=P overrides
    device: str = opt("auto", **DEVICE_RULE)
    which: str = opt("best", choices=CHECKPOINTS)
    max_batch: int = opt(32, ge=1)  # images per model call
    max_wait_ms: float = opt(2.0, ge=0, le=1000)  # how long the first image of a batch waits for company
    max_request_mb: float = opt(20.0, gt=0, le=4096)  # request body limit
    max_files: int = opt(32, ge=1)  # files per request
    max_pixels: int = opt(40_000_000, ge=1)  # width x height per image, checked from the header
    timeout: float = opt(30.0, gt=0)  # seconds a client may take to send its headers, and its body
    max_connections: int = opt(64, ge=1)  # open connections; more get 503
    workers: int = opt(0, ge=0)  # decoding threads; 0 = min(8, cores)

    @property
    def max_bytes(self) -> int:
        return int(self.max_request_mb * 1_000_000)

    def limits(self) -> dict:
        return {"max_request_bytes": self.max_bytes, "max_files": self.max_files, "max_pixels": self.max_pixels,
                "timeout_s": self.timeout, "max_connections": self.max_connections}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- the app

def create_app(backend: Backend, cfg: ServeConfig):
    """The Starlette app serving `backend` under `cfg`'s limits."""
    import contextlib
    from concurrent.futures import ThreadPoolExecutor

    import anyio
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from imgarena import __version__
    from imgarena.predict import default_workers

    batcher = MicroBatcher(backend.logits_fn, max_batch=cfg.max_batch, max_wait=cfg.max_wait_ms / 1000)
    decode_pool = ThreadPoolExecutor(max_workers=default_workers(cfg.workers), thread_name_prefix="imgarena-upload")
    stats = {"requests": 0, "rejected": 0}
    pages = {path: (resources.files("imgarena.serve").joinpath("assets", name).read_bytes(), mime)
             for path, (name, mime) in ASSETS.items()}

    def json(data, status: int = 200, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(data, status, headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                                                   **(headers or {})})

    def error(message: str, status: int = 400, file: str | None = None, **extra) -> JSONResponse:
        stats["rejected"] += 1
        body = {"error": message, **({"file": file} if file is not None else {}), **extra}
        return json(body, status, {"WWW-Authenticate": "Bearer"} if status == 401 else None)

    def refused(request) -> JSONResponse | None:
        """Why this API request may not proceed (token, cross-origin), or None."""
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            return error("cross-origin requests are refused: call the API from your own code or the page at /", 403)
        if cfg.token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), cfg.token.encode()):
                return error("missing or wrong token: send the header 'Authorization: Bearer TOKEN' "
                             "with the server's --token", 401)
        return None

    async def read_body(request) -> bytes:
        """The body, in memory, at most max_bytes of it. An oversized body (up to twice the limit)
        is read and dropped before answering: closing on unread bytes resets the connection, and
        the client would never see the JSON error."""
        limit = cfg.max_bytes
        too_big = (f"request body over the server's limit of {limit} bytes (--max-request-mb {cfg.max_request_mb:g}): "
                   "send fewer or smaller images per request")
        length = request.headers.get("content-length")
        if length is not None and not length.strip().isdigit():
            raise UploadError(f"bad Content-Length {length!r}")
        declared = int(length) if length is not None else 0
        if declared > 2 * limit:
            raise UploadError(too_big)
        body, seen, over = bytearray(), 0, declared > limit
        try:
            with anyio.fail_after(cfg.timeout):
                async for chunk in request.stream():
                    seen += len(chunk)
                    over = over or seen > limit
                    if not over:
                        body += chunk
                    elif seen > 2 * limit:
                        break
        except TimeoutError:
            raise UploadError(f"request body not received within {cfg.timeout:g} s (--timeout)", status=408) from None
        if over:
            raise UploadError(too_big)
        return bytes(body)

    def parse_topk(value, default: int) -> int:
        if value is None:
            return default
        try:
            k = int(value)
        except ValueError:
            k = 0
        if k < 1:
            raise UploadError(f"topk must be a whole number >= 1, got {value!r}")
        return k

    def parse_min_prob(value, default):
        if value is None or value == "":
            return default
        try:
            p = float(value)
        except ValueError:
            p = -1.0
        if not 0 <= p <= 1:
            raise UploadError(f"min_prob must be a probability between 0 and 1, got {value!r}")
        return p

    def decode(upload):
        try:
            return decode_upload(upload.data, backend.preprocessing, max_pixels=cfg.max_pixels), None
        except BadImage as e:
            return None, str(e)

    async def predict(request):
        stats["requests"] += 1
        if (denied := refused(request)) is not None:
            return denied
        with batcher.coming() as ticket:  # the batcher may wait a moment for this request's images
            try:
                topk = parse_topk(request.query_params.get("topk"), cfg.topk)
                min_prob = parse_min_prob(request.query_params.get("min_prob"), cfg.min_prob)
                body = await read_body(request)
                name = request.headers.get("x-filename") or request.query_params.get("filename")
                uploads, fields = uploads_from_body(body, request.headers.get("content-type", ""), filename=name,
                                                    max_files=cfg.max_files)
                topk = parse_topk(fields.get("topk"), topk)
                min_prob = parse_min_prob(fields.get("min_prob"), min_prob)
            except UploadError as e:
                return error(str(e), e.status, e.file)
            except ClientDisconnect:
                return Response(status_code=400)  # nobody is listening any more
            loop = asyncio.get_running_loop()
            decoded = await asyncio.gather(*(loop.run_in_executor(decode_pool, decode, u) for u in uploads))
            bad = [{"file": u.name, "error": err} for u, (_, err) in zip(uploads, decoded) if err is not None]
            if bad:
                return error(f"{bad[0]['file']}: {bad[0]['error']}", 400, bad[0]["file"], errors=bad)
            logits = await ticket.logits([a for a, _ in decoded])
        rows = backend.rows([u.name for u in uploads], backend.probabilities(logits), topk, min_prob)
        return json({"model": backend.info()["model"]["name"], "backend": backend.kind,
                     "rows": [r.as_dict() for r in rows]})

    async def health(request):
        return json({"status": "ok", "backend": backend.kind, "auth": cfg.token is not None})

    async def info(request):
        if (denied := refused(request)) is not None:
            return denied
        return json({**backend.info(), "topk": cfg.topk, "min_prob": cfg.min_prob, "limits": cfg.limits(), "imgarena_version": __version__,
                     "batching": {"max_batch": cfg.max_batch, "max_wait_ms": cfg.max_wait_ms},
                     "stats": {**stats, "images": batcher.images, "batches": batcher.batches}})

    async def page(request):
        data, mime = pages[request.url.path]
        return Response(data, media_type=mime, headers={"Content-Security-Policy": PAGE_CSP,
                                                        "X-Content-Type-Options": "nosniff",
                                                        "Referrer-Policy": "no-referrer"})

    async def http_error(request, exc: HTTPException):
        return error(f"{exc.detail}: {request.method} {request.url.path} (see GET /info, POST /predict)", exc.status_code)

    async def server_error(request, exc: Exception):
        return json({"error": f"internal error ({type(exc).__name__}): see the server log"}, 500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            decode_pool.shutdown(wait=False, cancel_futures=True)

    routes = [Route("/predict", predict, methods=["POST"]), Route("/health", health, methods=["GET"]),
              Route("/info", info, methods=["GET"])] + [Route(p, page, methods=["GET"]) for p in ASSETS]
    middleware = []
    if is_loopback(cfg.host):  # DNS rebinding: a loopback server answers only to loopback names
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=["localhost", "127.0.0.1", "[::1]", "::1"]))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.batcher, app.state.backend = batcher, backend
    return app


# ---------------------------------------------------------------- running it

def header_deadline_protocol(timeout: float):
    """uvicorn's h11 protocol plus a deadline for a request's headers: uvicorn closes idle keep-alive
    connections but would wait forever for a client that sends its headers a byte at a time."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        _timer = None  # at most one pending deadline per connection

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(timeout, self._deadline, self.cycle)

        def _deadline(self, cycle) -> None:
            if self.cycle is cycle and not self.transport.is_closing():  # no new request started since
                self.transport.close()

    return DeadlineH11Protocol


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when it says TCP,
    # and without it Nagle + delayed ACK add ~40 ms to every response
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port, or 0 for any free one") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def serve(cfg: ServeConfig, backend: Backend, *, on_ready=None, access_log: bool = True) -> None:
    """Bind, call on_ready(url) (connections queue from then on), and serve until interrupted."""
    import uvicorn

    app = create_app(backend, cfg)
    sock = bind(cfg.host, cfg.port)
    if not is_loopback(cfg.host) and cfg.token is None:
        print(f"imgarena serve: warning: listening on {cfg.host} without --token: anyone who can reach this "
              "machine can use the model", file=sys.stderr)
    config = uvicorn.Config(app, http=header_deadline_protocol(cfg.timeout), ws="none", lifespan="on",
                            limit_concurrency=cfg.max_connections, timeout_keep_alive=5,
                            timeout_graceful_shutdown=5, h11_max_incomplete_event_size=16 * 1024,
                            server_header=False, proxy_headers=False, access_log=access_log, log_level="info")
    if on_ready is not None:
        on_ready(url_of(sock))
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
