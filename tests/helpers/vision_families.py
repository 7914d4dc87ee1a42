"""Tiny random image-text-to-text models of three more families (Qwen2.5-VL, LLaVA, Gemma 3), built offline
(their chat templates and the image rows: tests/helpers/vision_rows.py).

Each is the family's own transformers classes at toy sizes (hidden and intermediate sizes multiples of 64, two
layers, a tiny vision tower), with the family's processor and a tokenizer built locally: the tests' tiny BPE
tokenizer (tests/conftest.py's ``tiny_model_dir``) plus the family's image and turn tokens as special tokens,
and a chat template written in the family's style (images rendered as the family's placeholder; message content
a string or a list of parts). Nothing is downloaded, so the tests run on any machine.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.helpers.vision_rows import GEMMA_TEMPLATE, LLAVA_TEMPLATE, QWEN_TEMPLATE

TEXT = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2}


@dataclass(frozen=True)
class Family:
    """A built model folder and what the tests check on it."""

    name: str
    folder: Path
    image_token: str  # the token each image is expanded into (one per image feature)
    end_of_turn: str  # what closes an assistant turn (trained with the answer)
    markers: bool  # the chat template has {% generation %} markers (else: turns located by offsets)
    answer_prefix: str = ""  # what the model writes before each answer (LLaVA: the space after "ASSISTANT:")
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of the rows' pictures


def family_tokenizer(base: Path, tokens: list[str], template: str, **named: str):
    """The tiny BPE tokenizer with the family's tokens (special: never split, never trained as words), its named
    special tokens (bos_token, eos_token, boi_token, ...) and its chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    tokenizer.add_tokens(tokens, special_tokens=True)
    standard = {k: v for k, v in named.items() if k in tokenizer.SPECIAL_TOKENS_ATTRIBUTES}
    tokenizer._set_model_specific_special_tokens({k: v for k, v in named.items() if k not in standard})
    for key, value in standard.items():
        setattr(tokenizer, key, value)
    tokenizer.chat_template = template
    return tokenizer


def vocab_rows(tokenizer) -> int:
    """Embedding rows for every id (a trained BPE vocabulary can have holes), a multiple of 64."""
    return 64 * math.ceil((max(tokenizer.get_vocab().values()) + 1) / 64)


def save(model, processor, out: Path) -> Path:
    model.to(torch.bfloat16).save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out


def torchvision_usable() -> bool:
    """Whether transformers can build video processors (torchvision-only in transformers 5): Qwen2-VL's and
    Qwen2.5-VL's processors hold one."""
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


@functools.cache
def images_only_qwen_processor():
    """Qwen2.5-VL's processor less its video processor, for machines without torchvision: the same image
    processor, tokenizer and placeholder expansion (Qwen2_5_VLProcessor's own), saved and loaded like it.
    AutoProcessor finds it by name once registered (``register_images_only_qwen``)."""
    from transformers import Qwen2_5_VLProcessor

    class Qwen2_5_VLImagesOnlyProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return Qwen2_5_VLImagesOnlyProcessor


def register_images_only_qwen(monkeypatch) -> None:
    """Let AutoProcessor load a folder saved with the images-only Qwen processor (undone by ``monkeypatch``)."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    monkeypatch.setitem(PROCESSOR_MAPPING._extra_content, Qwen2_5_VLConfig, images_only_qwen_processor())


def build_qwen(base: Path, out: Path) -> Family:
    """Qwen2.5-VL: a Qwen2 text model with 3D (M-RoPE) positions, a windowed ViT whose merger is the projector;
    the image processor's dynamic resolution gives each image (h/14)*(w/14)/4 tokens."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vision_tokens = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = family_tokenizer(base, vision_tokens, QWEN_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in vision_tokens}
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config={
            **TEXT,
            "vocab_size": vocab_rows(tokenizer),
            "num_key_value_heads": 1,
            "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "out_hidden_size": TEXT["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    kind = Qwen2_5_VLProcessor if torchvision_usable() else images_only_qwen_processor()
    processor = kind(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE)
    sizes = [(56, 56), (84, 56), (112, 84)]  # 4, 6 and 12 image tokens: dynamic resolution
    return Family("qwen2.5-vl", save(model, processor, out), "<|image_pad|>", "<|im_end|>", True, image_sizes=sizes)


def build_llava(base: Path, out: Path) -> Family:
    """LLaVA (1.5): a Llama text model, a CLIP vision tower (its second-to-last layer, CLS dropped) and a
    two-layer MLP projector; every image is resized and cropped to the tower's square, 16 tokens."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = family_tokenizer(base, ["<image>", "</s>"], LLAVA_TEMPLATE, eos_token="</s>")
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=64,
    )
    text = {
        **TEXT,
        "model_type": "llama",
        "vocab_size": vocab_rows(tokenizer),
        "num_key_value_heads": 1,
        "max_position_embeddings": 1024,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    sizes = [(40, 32), (32, 48)]
    return Family("llava", save(model, processor, out), "<image>", "</s>", True, " ", image_sizes=sizes)


def build_gemma3(base: Path, out: Path) -> Family:
    """Gemma 3: a Gemma 3 text model (sliding and global layers), a SigLIP tower, its pooled features projected
    (Gemma3MultiModalProjector); each <start_of_image> becomes \\n\\n<start_of_image>, the image's soft tokens
    (mm_tokens_per_image of them) and <end_of_image>\\n\\n."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, SiglipVisionConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    image_tokens = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    turns = ["<bos>", "<start_of_turn>", "<end_of_turn>"]
    tokenizer = family_tokenizer(
        base, [*turns, *image_tokens.values()], GEMMA_TEMPLATE, bos_token="<bos>", **image_tokens
    )
    torch.manual_seed(0)
    text = {
        **TEXT,
        "vocab_size": vocab_rows(tokenizer),
        "num_key_value_heads": 1,
        "head_dim": 64,
        "query_pre_attn_scalar": 64,
        "sliding_window": 32,
        "max_position_embeddings": 1024,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<end_of_turn>"),
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,  # the 4x4 patches pooled 2x2
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
    )
    model = Gemma3ForConditionalGeneration(config)
    # transformers starts the projection at zero (no image reaches the language model, no gradient reaches the
    # tower); a released checkpoint's is trained
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.02)
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4, chat_template=GEMMA_TEMPLATE
    )
    sizes = [(48, 32), (32, 32)]
    return Family(
        "gemma3", save(model, processor, out), "<image_soft_token>", "<end_of_turn>", False, image_sizes=sizes
    )


BUILDERS = {"qwen2.5-vl": build_qwen, "llava": build_llava, "gemma3": build_gemma3}


@pytest.fixture(scope="module", params=list(BUILDERS))
def vision_family(request, tiny_model_dir, tmp_path_factory):
    """Each family's tiny model and processor, built in a tmp folder (AutoProcessor can load it)."""
    torch.set_num_threads(1)  # tiny models; other work shares the cores
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "qwen2.5-vl" and not torchvision_usable():
            register_images_only_qwen(patch)
        yield BUILDERS[request.param](tiny_model_dir, tmp_path_factory.mktemp(request.param) / "model")
