"""task: vision on three more families of AutoModelForImageTextToText (Qwen2.5-VL, LLaVA, Gemma 3), each a tiny
random model with its own processor and chat template (tests/helpers/vision_families.py): the rows are kept, the
ids are the processor's own expansion, the loss is on the answers and their end-of-turn tokens only, the image
token counts are the processor's, and a 4-bit load with LoRA trains on a collated batch."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from qlora_pipe.data.prepared import IGNORE
from qlora_pipe.recipe import validate_recipe
from tests.helpers.data import write_jsonl
from tests.helpers.vision_families import (  # noqa: F401 (vision_family: the fixture)
    Family,
    family_tokenizer,
    torchvision_usable,
    vision_family,
)
from tests.helpers.vision_rows import QWEN_TEMPLATE, family_rows


def vision_recipe(family, rows_path: Path, out: Path) -> dict:
    return {
        "run_name": family.name,
        "output_dir": str(out),
        "seed": 3,
        "task": "vision",
        "model": {"name_or_path": str(family.folder)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "vision": {"tower": "lora", "projector": "full"},
        "data": {"train_path": str(rows_path), "max_length": 256},
        "training": {"max_steps": 1, "micro_batch_size": 2, "optimizer": "adamw_torch"},
    }


SPANS_ON_PARTS = (
    "data/turn_spans.py::assistant_spans reads each message's content as a string (.strip()), but a vision row's "
    "content is a list of parts: a chat template without {% generation %} markers fails on every vision row"
)


@dataclass
class Prepared:
    recipe: Any
    tokenizer: Any
    processor: Any
    rows: list[dict]  # family_rows: each row as written, its messages as parts, its image files, its answers
    data: Any  # the data stage's PreparedData (loss on the assistant's turns; see masking_failure)
    masking_failure: str | None = None  # why the assistant-only mask failed (the data was then made with loss_on: all)


@pytest.fixture(scope="module")
def prepared(vision_family, tmp_path_factory) -> Prepared:  # noqa: F811
    """The family's rows through the data stage of a validated vision recipe."""
    from qlora_pipe.methods import method_for
    from qlora_pipe.models.loading import load_tokenizer

    folder = tmp_path_factory.mktemp(f"{vision_family.name}-rows")
    rows = family_rows(vision_family, folder)
    write_jsonl(folder / "train.jsonl", [r["row"] for r in rows])
    raw = vision_recipe(vision_family, folder / "train.jsonl", folder / "runs")
    recipe = validate_recipe(raw)
    tokenizer = load_tokenizer(recipe)
    method = method_for(recipe)
    try:
        return Prepared(
            recipe, tokenizer, method.processor(recipe, tokenizer), rows, method.prepare_data(recipe, tokenizer)
        )
    except AttributeError as exc:
        if vision_family.markers or "'list' object has no attribute 'strip'" not in str(exc):
            raise
    raw["data"]["loss_on"] = "all"  # the model's checks still run, on rows trained whole
    recipe = validate_recipe(raw)
    tokenizer = load_tokenizer(recipe)
    data = method.prepare_data(recipe, tokenizer)
    return Prepared(recipe, tokenizer, method.processor(recipe, tokenizer), rows, data, SPANS_ON_PARTS)


def trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The trained tokens, one list per contiguous run."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def image_runs(ids: list[int], image_id: int) -> list[int]:
    """The lengths of the runs of image tokens: one run per image."""
    lengths, count = [], 0
    for token in [*ids, None]:
        if token == image_id:
            count += 1
        elif count:
            lengths.append(count)
            count = 0
    return lengths


def opened(paths: list[Path]) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in paths]


def test_the_loss_is_on_the_answers_only_and_ids_are_the_processors_own(vision_family, prepared):  # noqa: F811
    if prepared.masking_failure:
        pytest.xfail(prepared.masking_failure)
    tokenizer, processor, rows, data = prepared.tokenizer, prepared.processor, prepared.rows, prepared.data
    family = vision_family
    report = data.reports[0]
    assert len(data.train) == len(rows), report.line()  # 1. every row kept
    assert data.eval is None
    expected_masking = "{% generation %} markers" if family.markers else f"closed by {family.end_of_turn}"
    assert expected_masking in report.masking
    image_id = tokenizer.convert_tokens_to_ids(family.image_token)
    per_size = {}
    assert tokenizer.encode(family.image_token, add_special_tokens=False) == [image_id]  # one token, never split
    for source, encoded in zip(rows, data.train, strict=True):
        ids, labels = encoded["input_ids"], encoded["labels"]
        # 2. exactly the processor's expansion of the rendered conversation and its images
        text = tokenizer.apply_chat_template(source["messages"], tokenize=False)
        images = opened(source["images"])
        expected = processor(text=[text], images=[images], add_special_tokens=False)["input_ids"][0]
        assert ids == list(expected), family.name
        assert encoded["image_files"] == [p.read_bytes() for p in source["images"]]
        # 3. each answer and its end-of-turn token trained, nothing else: no image token, no prompt
        answers = [tokenizer.decode(run) for run in trained_runs(ids, labels)]
        assert answers == [family.answer_prefix + a + family.end_of_turn for a in source["answers"]], family.name
        assert all(label == IGNORE for t, label in zip(ids, labels, strict=True) if t == image_id)
        # 4. as many image tokens per image as the processor says
        sizes = [(image.height, image.width) for image in images]
        counts = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
        assert image_runs(ids, image_id) == list(counts), family.name
        per_size.update(zip(sizes, counts, strict=True))
    if family.name == "qwen2.5-vl":  # dynamic resolution: each image size its own number of tokens
        assert len(per_size) == len(set(per_size.values())) == 3, per_size


def test_the_report_counts_every_image_token(vision_family, prepared):  # noqa: F811
    tokenizer, rows, data = prepared.tokenizer, prepared.rows, prepared.data
    image_id = tokenizer.convert_tokens_to_ids(vision_family.image_token)
    parts = data.reports[0].conversation_parts
    assert parts["images"] == sum(len(r["images"]) for r in rows)
    if vision_family.name == "gemma3" and parts["image_tokens"] == parts["images"]:
        pytest.xfail(
            "vision/encode.py counts processor.image_token_id, which Gemma3Processor sets to <start_of_image> "
            "(one per image), not the <image_soft_token>s the image becomes (processor.image_token_ids)"
        )
    assert parts["image_tokens"] == sum(r["input_ids"].count(image_id) for r in data.train)


def test_the_parts_are_found_and_a_4bit_lora_step_trains(vision_family, prepared):  # noqa: F811
    from transformers import AutoConfig

    from qlora_pipe.vision.collate import VisionCollator
    from qlora_pipe.vision.model import load_vision_policy, vision_parts

    recipe, tokenizer, processor, data = prepared.recipe, prepared.tokenizer, prepared.processor, prepared.data
    # 5. the language model found; the tower and projector beside it, outside it
    parts = vision_parts(AutoConfig.from_pretrained(vision_family.folder))
    assert parts.language == "model.language_model"
    assert parts.tower and parts.projector
    for name in (*parts.tower, *parts.projector):
        assert not name.startswith(parts.language + ".") and name != parts.language
    assert parts.linear["language"] and parts.linear["tower"]
    # Gemma 3's projector is a norm and a matmul with a weight of its own: no linear layer for LoRA
    assert bool(parts.linear["projector"]) == (vision_family.name != "gemma3")
    assert all(n.startswith(parts.language + ".") for n in parts.linear["language"])

    torch.manual_seed(0)
    model = load_vision_policy(recipe, tokenizer).model
    quantized = {n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    assert quantized and all(parts.language in n for n in quantized)
    assert not any(p in n for n in quantized for p in (*parts.tower, *parts.projector))
    batch = VisionCollator(processor)([data.train[0], data.train[1]])
    model.train()
    loss = model(**batch).loss
    assert math.isfinite(loss.item())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    moved = {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    assert any("lora_B" in n and parts.language in n for n in moved), sorted(moved)[:8]
    assert any("lora_B" in n and any(t + "." in n for t in parts.tower) for n in moved), sorted(moved)[:8]
    projector = parts.projector[0].rpartition(".")[2]
    assert any("modules_to_save" in n and projector in n for n in moved), sorted(moved)[:8]


def test_the_collated_batch_is_what_the_processor_gives_the_model(vision_family, prepared):  # noqa: F811
    """The collator's batch gives the model the loss the processor's own inputs give it, for the same rows."""
    from transformers import AutoModelForImageTextToText

    from qlora_pipe.vision.collate import VisionCollator

    tokenizer, processor, rows, data = prepared.tokenizer, prepared.processor, prepared.rows, prepared.data
    picked = [1, 2]  # three images, two sizes
    batch = VisionCollator(processor)([data.train[i] for i in picked])
    full = processor(
        text=[tokenizer.apply_chat_template(rows[i]["messages"], tokenize=False) for i in picked],
        images=[opened(rows[i]["images"]) for i in picked],
        add_special_tokens=False,
        padding=True,
        return_tensors="pt",
    )
    for key in set(full) & set(batch):
        torch.testing.assert_close(batch[key], full[key], msg=key)
    model = AutoModelForImageTextToText.from_pretrained(vision_family.folder, dtype=torch.float32).eval()
    missing = sorted(set(full) - set(batch))
    with torch.no_grad():
        ours = model(**batch).loss.item()
        theirs = model(**full, labels=batch["labels"]).loss.item()
        completed = model(**batch, **{k: full[k] for k in missing}).loss.item()
    assert math.isclose(completed, theirs, rel_tol=1e-6), (completed, theirs)  # only the missing inputs differ
    if missing and not math.isclose(ours, theirs, rel_tol=1e-6):
        pytest.xfail(
            f"vision/collate.py::VisionCollator gives the model no {', '.join(missing)}: loss {ours:.6f} on the "
            f"collated batch, {theirs:.6f} on the processor's inputs for the same rows (and with them added)"
        )
    assert math.isclose(ours, theirs, rel_tol=1e-6), (ours, theirs, missing)


def test_a_released_qwen_processor_folder_loads_or_is_refused_in_one_line(tiny_model_dir, tmp_path):
    """A Qwen2.5-VL folder as released (processor_class Qwen2_5_VLProcessor) loads, or is a one-line error."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from qlora_pipe.errors import UserError
    from qlora_pipe.vision.model import load_processor

    tokenizer = family_tokenizer(tiny_model_dir, ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"], QWEN_TEMPLATE)
    tokenizer.save_pretrained(tmp_path)
    Qwen2VLImageProcessorPil().save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}))
    recipe = validate_recipe(vision_recipe(Family("qwen2.5-vl", tmp_path, "", "", True), tmp_path, tmp_path / "runs"))
    try:
        processor = load_processor(recipe)
    except UserError as exc:
        assert "torchvision" in str(exc) and "\n" not in str(exc)
    else:
        assert type(processor).__name__ == "Qwen2_5_VLProcessor"
