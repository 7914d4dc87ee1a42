"""One vision row -> the model's input ids, labels and images, with its loss mask proven token by token.

The conversation is masked as text rows are (data/chat_masks.py: {% generation %} markers or located turns),
with each image rendered by the chat template as its placeholder. The processor then expands every placeholder
into the image's tokens (how many depends on the image and the processor's settings). The two token lists are
aligned (difflib); the expanded tokens, and any token the expansion touched, are never trained, and a row
whose expansion would touch a trained token is refused: the labels always line up with what the model sees.
A row longer than data.max_length is dropped, or truncated after its last image only: never inside one.
"""

from __future__ import annotations

import base64
import difflib
from typing import Any

from qlora_pipe.data.chat_masks import encode_conversation, render
from qlora_pipe.data.prepared import IGNORE
from qlora_pipe.vision.collate import IMAGE_COLUMN
from qlora_pipe.vision.images import open_rgb


class BadVisionRow(ValueError):
    """Why a vision row cannot be trained (its drop reason)."""


def expanded(processor, text: str, images: list) -> list[int]:
    """The processor's input ids for ``text`` with its image placeholders expanded for ``images``."""
    try:
        out = processor(text=[text], images=[images] if images else None, add_special_tokens=False)
    except ValueError as exc:  # "the number of images does not match the placeholders", ...
        raise BadVisionRow(f"processor refused the row ({' '.join(str(exc).split())[:120]})") from exc
    ids = out["input_ids"][0]
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def image_token_ids(processor) -> set[int]:
    """The ids of the tokens that stand for image features (Gemma 3's soft tokens, not its <start_of_image>)."""
    ids = getattr(processor, "image_token_ids", None)
    if ids:
        return set(ids)
    single = getattr(processor, "image_token_id", None)
    return {single} if single is not None else set()


def aligned_mask(short: list[int], mask: list[int], long: list[int]) -> tuple[list[int], list[bool]]:
    """``mask`` (over ``short``, placeholders unexpanded) carried over to ``long``, and which of ``long``'s
    tokens the expansion added or replaced."""
    out, changed = [0] * len(long), [True] * len(long)
    matcher = difflib.SequenceMatcher(None, short, long, autojunk=False)
    for tag, a0, a1, b0, b1 in matcher.get_opcodes():
        if tag == "equal":
            out[b0:b1] = mask[a0:a1]
            changed[b0:b1] = [False] * (b1 - b0)
        elif any(mask[a0:a1]):
            raise BadVisionRow("the image expansion changes trained tokens")
    return out, changed


def encode_vision(example: dict[str, Any], processor, template: str | None, data, turns) -> dict[str, Any]:
    """input_ids, labels and image bytes of one normalized example (vision/rows.py), with its report fields;
    BadVisionRow when it cannot be trained."""
    tokenizer = processor.tokenizer
    images = [base64.b64decode(x) for x in example["images"]]
    conversation = {"messages": example["messages"]}
    encoded = encode_conversation(conversation, tokenizer, template, data, False, turns)
    text = render(tokenizer, example["messages"], None, template if data.loss_on != "all" else None)
    ids = expanded(processor, text, [open_rgb(b) for b in images])
    mask, changed = aligned_mask(encoded.input_ids, encoded.mask, ids)
    image_tokens = sum(1 for t in ids if t in image_token_ids(processor)) or sum(changed)
    truncated = False
    if len(ids) > data.max_length:
        last_image = max((i for i, c in enumerate(changed) if c), default=-1)
        if data.overlength != "truncate":
            raise BadVisionRow(f"longer than max_length {data.max_length}")
        if last_image >= data.max_length:
            raise BadVisionRow("max_length would cut an image")
        ids, mask, truncated = ids[: data.max_length], mask[: data.max_length], True
    if not any(mask):
        raise BadVisionRow("no trained tokens")
    return {
        "input_ids": ids,
        "labels": [t if m else IGNORE for t, m in zip(ids, mask, strict=True)],
        IMAGE_COLUMN: images,
        "n_tokens": len(ids),
        "n_trained": sum(mask),
        "image_tokens": image_tokens,
        "truncated": truncated,
    }
