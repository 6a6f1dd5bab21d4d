"""Turn an HTTP request body into named in-memory images: limits first, then parsing, then decoding.

Nothing here touches the disk: bodies are read into memory up to a byte limit (the limit is what
makes that safe), multipart parts are collected into `bytes`, and images are decoded from
`io.BytesIO` with the same Pillow steps as `imgarena.data.images.decode_image`, so a served image
gets exactly the preprocessing `imgarena predict` gives the same file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from imgarena.data.images import BadImage, decode_image, decode_settings

RAW_TYPES = ("application/octet-stream",)  # plus any image/* type
MAX_NAME = 200  # characters of an uploaded file name echoed back


class UploadError(Exception):
    """A request the client must fix; becomes a 4xx JSON error. `file` names the upload at fault."""

    def __init__(self, message: str, *, status: int = 400, file: str | None = None):
        super().__init__(message)
        self.status, self.file = status, file


@dataclass
class Upload:
    name: str  # the client's file name (or a placeholder): echoed back as the row's "path"
    data: bytes


def clean_name(name: str | None, index: int) -> str:
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1].strip()  # a browser may send a full path
    name = "".join(ch for ch in name if ch.isprintable())
    return name[:MAX_NAME] or f"upload-{index + 1}"


# ---------------------------------------------------------------- multipart/form-data, in memory

def parse_multipart(body: bytes, content_type: str, *, max_files: int) -> tuple[list[Upload], dict[str, str]]:
    """(file parts in order, text fields) of a complete multipart body."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError("multipart/form-data without a boundary: let the HTTP client build the form")
    parts: list[dict] = []
    state = {"field": b"", "value": b"", "ended": False}

    def on_part_begin():
        parts.append({"headers": {}, "data": bytearray()})

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        parts[-1]["headers"][state["field"].decode("latin-1").lower()] = state["value"].decode("utf-8", "replace")
        state["field"], state["value"] = b"", b""

    def on_part_data(data, start, end):
        parts[-1]["data"] += data[start:end]

    def on_end():
        state["ended"] = True

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                        "on_header_value": on_header_value, "on_header_end": on_header_end,
                                        "on_part_data": on_part_data, "on_end": on_end})
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise UploadError(f"malformed multipart body ({e})") from None
    if not state["ended"]:
        raise UploadError("malformed multipart body (no closing boundary): the upload was cut short")

    files, fields = [], {}
    for part in parts:
        _, disp = parse_options_header(part["headers"].get("content-disposition", ""))
        field = disp.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in disp:
            if len(files) >= max_files:
                raise UploadError(f"more than {max_files} files in one request: send at most {max_files} "
                                  "(the server's --max-files)")
            files.append(Upload(clean_name(disp[b"filename"].decode("utf-8", "replace"), len(files)), bytes(part["data"])))
        else:
            fields[field] = bytes(part["data"]).decode("utf-8", "replace")
    return files, fields


def uploads_from_body(body: bytes, content_type: str, *, filename: str | None, max_files: int) -> tuple[list[Upload], dict]:
    """Uploads from a multipart form (files + text fields) or a raw image body (one file)."""
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime == "multipart/form-data":
        files, fields = parse_multipart(body, content_type, max_files=max_files)
        unknown = sorted(set(fields) - {"topk"})
        if unknown:
            raise UploadError(f"unexpected form field {unknown[0]!r}: send images as file fields "
                              "(e.g. curl -F file=@cat.jpg) and options as ?topk=N")
        if not files:
            raise UploadError("no files in the form: attach images as file fields (e.g. curl -F file=@cat.jpg)")
        return files, fields
    if mime.startswith("image/") or mime in RAW_TYPES:
        return [Upload(clean_name(filename, 0), body)], {}
    raise UploadError(f"unsupported Content-Type {mime or '(none)'!r}: send multipart/form-data with file fields, "
                      "or the raw bytes of one image as image/* or application/octet-stream")


# ---------------------------------------------------------------- decoding

def decode_upload(data: bytes, preprocessing: dict, *, max_pixels: int) -> np.ndarray:
    """Bytes of one image file -> uint8 (C, H, W) with a checkpoint's preprocessing, decoded exactly as
    files are (imgarena.data.images); BadImage with the reason otherwise. The pixel count is checked
    from the header, before anything is decoded."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    return decode_image(io.BytesIO(data), **decode_settings(preprocessing), max_pixels=max_pixels)[0]
