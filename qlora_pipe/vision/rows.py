"""A data row with images -> ``{"messages": [...], "images": [base64 of each file]}``, or why it is dropped.

Two forms are read. Chat rows whose message content is a list of parts, ``{"type": "image", ...}`` (the
image given by ``path``, ``url``, ``image``, ``base64`` or ``bytes``; OpenAI's ``image_url`` parts too) and
``{"type": "text", "text": ...}``. And the LLaVA/ShareGPT form: ``<image>`` placeholders in the text of
``messages`` (or ShareGPT's ``conversations``) and the images, in order, in an ``images`` (or ``image``)
column. Both become content-part lists in which each image is a bare ``{"type": "image"}`` part, in the
order of the kept ``images``: the shape the processors' chat templates read. Images may appear in user and
system turns; an image in an assistant turn is dropped with its reason (nothing would train on it).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from qlora_pipe.vision.images import BadImage, image_bytes

PLACEHOLDER = "<image>"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_TYPES = ("image", "image_url")


def vision_example(row: dict[str, Any], folder: Path | None) -> dict[str, Any] | str:
    """The normalized example of one row (``folder``: where relative image paths are found), or its drop reason."""
    messages = row.get("messages")
    if isinstance(messages, str):  # a table column holding the conversation as JSON
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            return "messages are not valid JSON"
    if messages is None and isinstance(row.get("conversations"), list):
        messages = [
            {"role": SHAREGPT_ROLES.get(turn.get("from"), turn.get("from")), "content": turn.get("value")}
            for turn in row["conversations"]
            if isinstance(turn, dict)
        ]
    if not isinstance(messages, list) or not messages:
        return "no messages"
    column = row.get("images", row.get("image"))
    given = [] if column is None else column if isinstance(column, list) else [column]
    sources: list[Any] = []
    clean = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            return "unknown role"
        parts = content_parts(message.get("content"), sources)
        if isinstance(parts, str):
            return parts
        images_here = sum(p["type"] == "image" for p in parts)
        if message["role"] == "assistant" and images_here:
            return "image in an assistant turn"
        if not parts or not any(p["type"] == "image" or p["text"].strip() for p in parts):
            return "empty message"
        clean.append({"role": message["role"], "content": parts})
    if not any(m["role"] == "assistant" for m in clean):
        return "no assistant turn"
    placeholders = sources.count(None)
    if placeholders != len(given):  # TRL's bare {"type": "image"} parts count as placeholders too
        return f"image placeholders ({placeholders}) do not match images ({len(given)})"
    found = iter(given)
    try:
        encoded = [image_bytes(next(found) if source is None else source, folder) for source in sources]
    except BadImage as exc:
        return str(exc)
    return {"messages": clean, "images": [base64.b64encode(data).decode() for data in encoded]}


def content_parts(content: Any, sources: list[Any]) -> list[dict[str, str]] | str:
    """The content as parts; each image's source is appended to ``sources`` (None for an ``<image>``
    placeholder, whose image comes from the row's images column)."""
    if isinstance(content, str):
        parts: list[dict[str, str]] = []
        for index, piece in enumerate(content.split(PLACEHOLDER)):
            if index:
                parts.append({"type": "image"})
                sources.append(None)
            if piece:
                parts.append({"type": "text", "text": piece})
        return parts
    if not isinstance(content, list):
        return "missing or non-string field"
    parts = []
    for part in content:
        if not isinstance(part, dict):
            return "content part is not an object"
        kind = part.get("type")
        if kind in IMAGE_TYPES:
            parts.append({"type": "image"})
            reference = {k: v for k, v in part.items() if k != "type"}
            sources.append(reference or None)
        elif kind == "text" and isinstance(part.get("text"), str):
            if PLACEHOLDER in part["text"]:
                nested = content_parts(part["text"], sources)
                parts.extend(nested if isinstance(nested, list) else [])
            elif part["text"]:
                parts.append({"type": "text", "text": part["text"]})
        else:
            return f"unknown content part type {kind!r}"
    return parts


def image_count(example: dict[str, Any]) -> int:
    return sum(p["type"] == "image" for m in example["messages"] for p in m["content"])
