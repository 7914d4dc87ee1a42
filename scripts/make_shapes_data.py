"""Write the bundled image task (data/shapes/): pictures of two coloured shapes and questions about them.

Each 64x64 picture holds two shapes of different kinds (circle, square, triangle) and different colours
(red, green, blue, yellow), each in its own half (left/right or top/bottom, drawn at random), on a light
background. Questions ask the colour of one of its shapes ("What colour is the triangle?") or the shape of
one of its colours ("Which shape is blue?"), answered in one word. A model that only reads the question can
do no better than the most frequent answer; one that sees colours but not which shape wears them gets half;
reading the picture gets all. Rows are chat rows whose user message holds an image part (a path relative to
the JSONL file) and a text part. Deterministic.

    python scripts/make_shapes_data.py
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_pipe.vision.shapes import picture, question

DATA = Path(__file__).resolve().parents[1] / "data/shapes"
TRAIN, EVAL = 480, 120


def row(image_path: str, text: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image", "path": image_path}, {"type": "text", "text": text}]},
            {"role": "assistant", "content": answer},
        ]
    }


def main() -> None:
    rng = random.Random(0)
    (DATA / "images").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", TRAIN), ("eval", EVAL)):
        rows = []
        for index in range(count):
            image, shapes, _ = picture(rng)
            name = f"images/{split}-{index:04d}.png"
            image.save(DATA / name, optimize=True)
            rows.append(row(name, *question(rng, shapes)))
        with (DATA / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
