"""Pictures of two coloured shapes, with questions about them and a per-pixel map of what is where.

The bundled image task (data/shapes/, scripts/make_shapes_data.py) and the pretraining of the small vision
encoder of build-vision-model draw from here. Each 64x64 picture holds two shapes of different kinds
(circle, square, triangle) and different colours (red, green, blue, yellow), each in its own half (left and
right, or top and bottom), on a light background. A question asks the colour of one of its shapes ("What
colour is the triangle?") or the shape of one of its colours ("Which shape is blue?"); the answer is one word.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

SIZE = 64
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
# What the encoder's pretraining predicts for each patch: background, or one (shape, colour) pair.
CLASSES = ["background"] + [f"{c} {s}" for s in SHAPES for c in sorted(COLOURS)]


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill) -> None:
    left, top, right, bottom = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(left, bottom), ((left + right) // 2, top), (right, bottom)], fill=fill)


def picture(rng: random.Random) -> tuple[Image.Image, dict[str, str], Image.Image]:
    """Two shapes of different kinds and colours, one per half: the image, shape -> colour, and the map of each
    pixel's class (an index into CLASSES)."""
    kinds = rng.sample(SHAPES, 2)
    colours = rng.sample(sorted(COLOURS), 2)
    shade = rng.randint(235, 255)
    image = Image.new("RGB", (SIZE, SIZE), (shade, shade, shade))
    classes = Image.new("L", (SIZE, SIZE), 0)
    draw, label = ImageDraw.Draw(image), ImageDraw.Draw(classes)
    across = rng.random() < 0.5
    for half, (kind, colour) in enumerate(zip(kinds, colours, strict=True)):
        size = rng.randint(18, 26)
        if across:  # left and right halves
            x = half * SIZE // 2 + rng.randint(2, SIZE // 2 - size - 2)
            y = rng.randint(4, SIZE - size - 4)
        else:  # top and bottom halves
            x = rng.randint(4, SIZE - size - 4)
            y = half * SIZE // 2 + rng.randint(2, SIZE // 2 - size - 2)
        box = (x, y, x + size, y + size)
        draw_shape(draw, kind, box, COLOURS[colour])
        draw_shape(label, kind, box, CLASSES.index(f"{colour} {kind}"))
    return image, dict(zip(kinds, colours, strict=True)), classes


def question(rng: random.Random, shapes: dict[str, str]) -> tuple[str, str]:
    kind = rng.choice(sorted(shapes))
    if rng.random() < 0.5:
        return f"What colour is the {kind}?", shapes[kind]
    return f"Which shape is {shapes[kind]}?", kind
