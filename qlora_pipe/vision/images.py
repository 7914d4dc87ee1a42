"""One image of a data row: found, read and decoded, or the reason the row is dropped.

An image is given as a path (relative to the data file's folder, or absolute), an http(s) URL, a data URL, base64
text, raw bytes, or a ``{"bytes": ..., "path": ...}`` record (how Parquet files written by ``datasets`` store an
Image column). What is kept is the file's own bytes, untouched: the model's processor resizes and normalizes them
at training time, exactly as at chat and eval time. Every image is decoded once here, so a broken file is a
counted drop at the data stage and never a traceback in the middle of a run.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

FETCH_SECONDS = 20
MAX_PIXELS = 64_000_000  # Pillow's own bound for decompression bombs is ~89M pixels: refuse before decoding


class BadImage(ValueError):
    """Why an image cannot be used (the data report's drop reason)."""


def image_bytes(value: Any, folder: Path | None) -> bytes:
    """The encoded bytes of one image reference (see the module's docstring); BadImage when it cannot be read."""
    if isinstance(value, dict):
        if value.get("bytes"):
            given = value["bytes"]
            return decoded(from_base64(given) if isinstance(given, str) else bytes(given))
        if isinstance(value.get("base64"), str):
            return decoded(
                from_base64(
                    value["base64"].partition(",")[2] if value["base64"].startswith("data:") else value["base64"]
                )
            )
        for key in ("path", "url", "image"):
            if value.get(key):
                return image_bytes(value[key], folder)
        if isinstance(value.get("image_url"), dict | str):  # OpenAI's {"image_url": {"url": ...}}
            inner = value["image_url"]
            return image_bytes(inner.get("url") if isinstance(inner, dict) else inner, folder)
        raise BadImage("image part names no image")
    if isinstance(value, bytes | bytearray):
        return decoded(bytes(value))
    if not isinstance(value, str) or not value.strip():
        raise BadImage("image part names no image")
    if value.startswith("data:"):
        return decoded(from_base64(value.partition(",")[2]))
    if value.startswith(("http://", "https://")):
        return decoded(fetched(value))
    if len(value) > 512 and "/" not in value[:64] and "." not in value[-8:]:  # a long string with no path shape
        return decoded(from_base64(value))
    return decoded(read_path(value, folder))


def from_base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise BadImage("image base64 not decodable") from exc


def read_path(value: str, folder: Path | None) -> bytes:
    path = Path(value).expanduser()
    if not path.is_absolute() and folder is not None:
        path = folder / path
    if not path.is_file():
        raise BadImage("image file missing")
    return path.read_bytes()


def fetched(url: str) -> bytes:
    from urllib.error import URLError
    from urllib.request import urlopen

    try:
        with urlopen(url, timeout=FETCH_SECONDS) as response:
            return response.read()
    except (URLError, OSError, ValueError) as exc:
        raise BadImage("image url unreachable") from exc


def decoded(data: bytes) -> bytes:
    """``data`` when it decodes to a whole image of a sane size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = image.width * image.height
            if pixels <= MAX_PIXELS:
                image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImage("image not decodable") from exc
    if pixels > MAX_PIXELS:
        raise BadImage(f"image larger than {MAX_PIXELS:,} pixels")
    return data


def open_rgb(data: bytes):
    """The image as the processors take it: a PIL image in RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")
