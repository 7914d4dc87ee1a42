"""The other side of tests/helpers/vision_families.py's tiny models: each family's chat template (written in the
family's style, images rendered as its placeholder) and the image rows the tests prepare with them."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from tests.helpers.vision_families import Family

# Qwen2-VL's ChatML: a default system turn, each image as <|vision_start|><|image_pad|><|vision_end|>; the
# assistant's words and its <|im_end|> inside {% generation %}.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{%- set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{%- else %}{%- set parts = message['content'] %}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{%- for part in parts %}{{- part['text'] }}{%- endfor %}{{- '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{%- for part in parts %}"
    "{%- if part['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# LLaVA 1.5's "USER: <image>\n... ASSISTANT: ...</s>" layout: images first in a turn, then its text. The generation
# prompt is "ASSISTANT:", so the model writes the space before its answer: " answer</s>" is inside {% generation %}.
LLAVA_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{%- else %}{%- set parts = message['content'] %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- parts | map(attribute='text') | join('') + '\\n' }}"
    "{%- elif message['role'] == 'user' %}{{- 'USER: ' }}"
    "{%- for part in parts | selectattr('type', 'equalto', 'image') %}{{- '<image>\\n' }}{%- endfor %}"
    "{%- for part in parts | selectattr('type', 'equalto', 'text') %}{{- part['text'] }}{%- endfor %}{{- ' ' }}"
    "{%- else %}{{- 'ASSISTANT:' }}"
    "{%- generation %}{{- ' ' }}{%- for part in parts %}{{- part['text'] }}{%- endfor %}{{- '</s>' }}"
    "{%- endgeneration %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'ASSISTANT:' }}{%- endif %}"
)

# Gemma 3's turns (<start_of_turn>user / model ... <end_of_turn>), the system text opening the first user turn,
# each image as <start_of_image>. No {% generation %} markers, as released: its turns are located by offsets.
GEMMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set first = messages[0]['content'] + '\\n\\n' %}"
    "{%- else %}{%- set first = messages[0]['content'][0]['text'] + '\\n\\n' %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first if loop.first else '') }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<start_of_image>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] | trim }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)


def picture(size: tuple[int, int], shift: int) -> bytes:
    """A PNG of a coloured disc on white, its place and colour set by ``shift`` (so every picture is its own)."""
    image = Image.new("RGB", size, "white")
    width, height = size
    x, y = shift * 3 % max(1, width // 3), shift * 5 % max(1, height // 3)
    colour = ((shift * 70) % 256, (120 + shift * 40) % 256, (200 - shift * 30) % 256)
    ImageDraw.Draw(image).ellipse((x, y, x + width // 2, y + height // 2), fill=colour)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def family_rows(family: Family, folder: Path) -> list[dict]:
    """Rows for ``family`` with their PNG files in ``folder``: image parts naming a path and the LLaVA form (an
    <image> placeholder, the file in the images column), one and two images, a system turn, two assistant turns.
    Each as ``row`` (as written), ``messages`` (content parts, bare image parts: what the chat template renders),
    ``images`` (the files, in order) and ``answers``."""
    sizes = family.image_sizes
    files = []
    for i in range(4):
        path = folder / f"picture-{i}.png"
        path.write_bytes(picture(sizes[i % len(sizes)], i))
        files.append(path)

    def text(value: str) -> dict:
        return {"type": "text", "text": value}

    image = {"type": "image"}
    rows = [
        (  # one image by path, before the question
            [
                {
                    "role": "user",
                    "content": [{"type": "image", "path": files[0].name}, text("What is in the picture?")],
                },
                {"role": "assistant", "content": "A green disc."},
            ],
            [files[0]],
            {},
        ),
        (  # a system turn, two images (two sizes), two assistant turns
            [
                {"role": "system", "content": "You describe pictures."},
                {
                    "role": "user",
                    "content": [
                        text("Compare these."),
                        {"type": "image", "path": files[1].name},
                        {"type": "image", "path": files[2].name},
                    ],
                },
                {"role": "assistant", "content": "The second disc is lower."},
                {"role": "user", "content": "And the colours?"},
                {"role": "assistant", "content": "Both are bright."},
            ],
            [files[1], files[2]],
            {},
        ),
        (  # the LLaVA form: an <image> placeholder in the text, the image in the images column
            [
                {"role": "user", "content": "<image>\nDescribe the shape."},
                {"role": "assistant", "content": "A round shape."},
            ],
            [files[3]],
            {"images": [files[3].name]},
        ),
    ]
    out = []
    for messages, images, extra in rows:
        expected = []
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                pieces = content.split("<image>")
                parts = [
                    p
                    for i, piece in enumerate(pieces)
                    for p in ([image] if i else []) + ([text(piece)] if piece else [])
                ]
            else:
                parts = [image if part["type"] == "image" else part for part in content]
            expected.append({"role": message["role"], "content": parts})
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        out.append({"row": {"messages": messages, **extra}, "messages": expected, "images": images, "answers": answers})
    return out
