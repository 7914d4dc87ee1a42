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
from pathlib import Path

from PIL import Image, ImageDraw

DATA = Path(__file__).resolve().parents[1] / "data/shapes"
SIZE = 64
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
TRAIN, EVAL = 480, 120


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill) -> None:
    left, top, right, bottom = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(left, bottom), ((left + right) // 2, top), (right, bottom)], fill=fill)


def picture(rng: random.Random) -> tuple[Image.Image, dict[str, str]]:
    """Two shapes of different kinds and colours, one per half; returns the image and shape -> colour."""
    kinds = rng.sample(SHAPES, 2)
    colours = rng.sample(sorted(COLOURS), 2)
    shade = rng.randint(235, 255)
    image = Image.new("RGB", (SIZE, SIZE), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    across = rng.random() < 0.5
    for half, (kind, colour) in enumerate(zip(kinds, colours, strict=True)):
        size = rng.randint(18, 26)
        if across:  # left and right halves
            x = half * SIZE // 2 + rng.randint(2, SIZE // 2 - size - 2)
            y = rng.randint(4, SIZE - size - 4)
        else:  # top and bottom halves
            x = rng.randint(4, SIZE - size - 4)
            y = half * SIZE // 2 + rng.randint(2, SIZE // 2 - size - 2)
        draw_shape(draw, kind, (x, y, x + size, y + size), COLOURS[colour])
    return image, dict(zip(kinds, colours, strict=True))


def question(rng: random.Random, shapes: dict[str, str]) -> tuple[str, str]:
    kind = rng.choice(sorted(shapes))
    if rng.random() < 0.5:
        return f"What colour is the {kind}?", shapes[kind]
    return f"Which shape is {shapes[kind]}?", kind


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
            image, shapes = picture(rng)
            name = f"images/{split}-{index:04d}.png"
            image.save(DATA / name, optimize=True)
            rows.append(row(name, *question(rng, shapes)))
        with (DATA / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
