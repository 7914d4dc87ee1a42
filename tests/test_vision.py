"""task: vision on a tiny Idefics3 (SmolVLM-shaped) model built locally: image rows read and checked, the loss
mask proven against the processor's own expansion, a real 4-bit run, the export checked and reloaded."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from qlora_pipe.recipe import validate_recipe
from tests.helpers.cli import assert_one_line_error, cli
from tests.helpers.data import write_jsonl, write_parquet

COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220)}


def picture(colour: str, shift: int = 0, size: int = 48) -> Image.Image:
    """A circle of the colour on white; ``shift`` moves it, so that every picture is its own."""
    image = Image.new("RGB", (size, size + 8), "white")
    x, y = shift % 12, shift // 12
    ImageDraw.Draw(image).ellipse((4 + x, 4 + y, size - 20 + x, size - 20 + y), fill=COLOURS[colour])
    return image


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def row(image_part: dict, answer: str, question: str = "What colour is the circle?") -> dict:
    return {
        "messages": [
            {"role": "user", "content": [image_part, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer},
        ]
    }


@pytest.fixture(scope="module")
def vlm_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from qlora_pipe.vision.builder import VisionSpec, build_vision_model

    return build_vision_model(tiny_model_dir, tmp_path_factory.mktemp("vlm") / "model", VisionSpec(pretrain_steps=50))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """24 training and 8 held-out rows, images beside the JSONL files."""
    folder = tmp_path_factory.mktemp("shapes")
    (folder / "images").mkdir()
    for split, count in (("train", 24), ("eval", 8)):
        rows = []
        for i in range(count):
            colour = sorted(COLOURS)[i % 2]
            picture(colour, i + 40 * (split == "eval")).save(folder / "images" / f"{split}-{i}.png")
            rows.append(row({"type": "image", "path": f"images/{split}-{i}.png"}, colour))
        write_jsonl(folder / f"{split}.jsonl", rows)
    return folder


def vision_recipe(vlm_dir: Path, shapes: Path, out: Path, **data) -> dict:
    return {
        "run_name": "vlm",
        "output_dir": str(out),
        "seed": 3,
        "task": "vision",
        "model": {"name_or_path": str(vlm_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "vision": {"tower": "full", "projector": "full"},
        "data": {
            "train_path": str(shapes / "train.jsonl"),
            "eval_path": str(shapes / "eval.jsonl"),
            "max_length": 128,
            **data,
        },
        "training": {
            "max_steps": 4,
            "micro_batch_size": 4,
            "learning_rate": 1e-3,
            "warmup_ratio": 0.0,
            "optimizer": "adamw_torch",
            "logging_steps": 1,
            "eval_steps": 100,
            "save_steps": 100,
        },
    }


def test_rows_of_every_form_become_parts_with_checked_images(tmp_path):
    from qlora_pipe.vision.rows import vision_example

    data = png(picture("red"))
    (tmp_path / "a.png").write_bytes(data)
    (tmp_path / "broken.png").write_bytes(data[:40])
    b64 = base64.b64encode(data).decode()
    kept = [
        row({"type": "image", "path": "a.png"}, "red"),
        row({"type": "image", "base64": b64}, "red"),
        row({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}}, "red"),
        row({"type": "image", "image": {"bytes": data, "path": None}}, "red"),  # a Parquet Image column
        {
            "messages": [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "red"}],
            "images": ["a.png"],
        },  # LLaVA form
        {
            "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}],
            "image": str(tmp_path / "a.png"),
        },  # ShareGPT with one image, absolute path
        {**row({"type": "image"}, "red"), "images": [{"bytes": data}]},  # TRL's bare image parts
    ]
    for raw in kept:
        example = vision_example(raw, tmp_path)
        assert isinstance(example, dict), (raw, example)
        assert [base64.b64decode(x) for x in example["images"]] == [data]
        user = example["messages"][0]["content"]
        assert [p["type"] for p in user] == ["image", "text"], user
        assert example["messages"][-1]["content"] == [{"type": "text", "text": "red"}]
    dropped = {
        "image file missing": row({"type": "image", "path": "nowhere.png"}, "red"),
        "image not decodable": row({"type": "image", "path": "broken.png"}, "red"),
        "image placeholders (2) do not match images (1)": {
            "messages": [{"role": "user", "content": "<image><image>?"}, {"role": "assistant", "content": "red"}],
            "images": ["a.png"],
        },
        "image in an assistant turn": {
            "messages": [
                {"role": "user", "content": "Draw it"},
                {"role": "assistant", "content": [{"type": "image", "path": "a.png"}]},
            ]
        },
        "unknown content part type 'audio'": row({"type": "audio", "path": "a.wav"}, "red"),
        "no assistant turn": {"messages": [{"role": "user", "content": [{"type": "image", "path": "a.png"}]}]},
    }
    for reason, raw in dropped.items():
        assert vision_example(raw, tmp_path) == reason


def test_loss_mask_is_the_answer_only_and_ids_are_the_processors_own(vlm_dir, shapes, tmp_path):
    from qlora_pipe.data.prepared import IGNORE
    from qlora_pipe.data.preview import vision_preview
    from qlora_pipe.methods import method_for
    from qlora_pipe.models.loading import load_tokenizer

    recipe = validate_recipe(vision_recipe(vlm_dir, shapes, tmp_path))
    tokenizer = load_tokenizer(recipe)
    method = method_for(recipe)
    processor = method.processor(recipe, tokenizer)
    data = method.prepare_data(recipe, tokenizer)
    assert len(data.train) == 24 and len(data.eval) == 8
    report = data.reports[0]
    assert report.conversation_parts["images"] == 24 and report.conversation_parts["image_tokens"] == 24 * 16
    source = [json.loads(line) for line in (shapes / "train.jsonl").read_text().splitlines()]
    image_id = processor.image_token_id
    for example, encoded in zip(source, data.train, strict=True):
        messages = example["messages"]
        text = processor.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": messages[1]["content"]}]},
            ]
        )
        image = Image.open(shapes / messages[0]["content"][0]["path"]).convert("RGB")
        expected = processor(text=[text], images=[[image]], add_special_tokens=False)["input_ids"][0]
        assert encoded["input_ids"] == list(expected)  # exactly what the processor gives the model
        trained = [t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label != IGNORE]
        assert tokenizer.decode(trained) == messages[1]["content"] + "<|im_end|>"
        assert encoded["input_ids"].count(image_id) == 16
        assert all(
            label == IGNORE for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if t == image_id
        )
    shown = vision_preview(data, processor, 1, color=False)
    assert "<image: 16 tokens>" in shown
    assert "[[red<|im_end|>]]" in shown or "[[blue<|im_end|>]]" in shown
    assert "images: 24 images, 384 image tokens, never trained" in shown


def test_truncation_never_cuts_an_image_and_bad_images_are_counted(vlm_dir, tmp_path):
    from qlora_pipe.methods import method_for
    from qlora_pipe.models.loading import load_tokenizer

    picture("red").save(tmp_path / "a.png")
    long_question = "Look closely at this picture please. " * 10
    rows = [
        row({"type": "image", "path": "a.png"}, "red " * 40),  # the image early: truncated after it
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": long_question}, {"type": "image", "path": "a.png"}],
                },
                {"role": "assistant", "content": "red"},
            ]
        },  # the image past the cut: dropped
        row({"type": "image", "path": "missing.png"}, "red"),
        row({"type": "image", "path": "a.png"}, "red"),
    ]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    raw = vision_recipe(vlm_dir, tmp_path, tmp_path / "runs", max_length=60, overlength="truncate")
    raw["data"]["train_path"] = str(tmp_path / "rows.jsonl")
    del raw["data"]["eval_path"]
    recipe = validate_recipe(raw)
    data = method_for(recipe).prepare_data(recipe, load_tokenizer(recipe))
    report = data.reports[0]
    assert report.dropped == {"max_length would cut an image": 1, "image file missing": 1}
    assert report.truncated == 1 and len(data.train) == 2
    assert max(len(r["input_ids"]) for r in data.train) == 60


def test_a_bad_image_with_on_bad_row_error_is_one_line(vlm_dir, shapes, tmp_path):
    good = png(picture("blue"))
    messages = [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "blue"}]
    write_parquet(  # LLaVA form, the image bytes in the table (as datasets writes an Image column)
        tmp_path / "rows.parquet",
        [{"messages": messages, "images": [{"bytes": good}]}, {"messages": messages, "images": [{"bytes": b"junk"}]}],
    )
    raw = vision_recipe(vlm_dir, shapes, tmp_path / "runs", on_bad_row="error")
    raw["data"]["train_path"] = str(tmp_path / "rows.parquet")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert_one_line_error(cli("data", str(path), "--preview", "1"), "row 2", "image not decodable")
    assert_one_line_error(cli("plan", str(path)), "task vision is not planned yet")
    assert_one_line_error(cli("validate", str(path), "--set", "data.max_length=auto"), "give data.max_length")


def test_a_vision_run_trains_exports_and_reloads_in_plain_transformers(vlm_dir, shapes, tmp_path, capsys, converter):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qlora_pipe.export.command import export_merged
    from qlora_pipe.runs import RunDir
    from qlora_pipe.training.stage import run_training
    from qlora_pipe.vision.answers import image_answers
    from qlora_pipe.vision.model import load_trained_vision

    result = run_training(validate_recipe(vision_recipe(vlm_dir, shapes, tmp_path, max_eval_samples=4)))
    run = RunDir(result.run_dir.root)
    summary = json.loads(run.summary.read_text())
    assert summary["task"] == "vision" and summary["steps"] == 4
    scores = summary["held_out"]
    assert set(scores) == {"before", "after"} and scores["after"]["rows"] == 4
    assert scores["after"]["baseline"]["answer"] in COLOURS
    assert (run.root / "processor_config.json").is_file()
    before_first = json.loads(run.metrics.read_text().splitlines()[0])
    assert before_first["step"] == 0 and "eval_loss" in before_first

    exported = export_merged(run.root, gguf_types=["q8_0"])
    assert exported.fidelity["passed"], exported.fidelity
    gguf = json.loads((exported.out / "fidelity.json").read_text())["gguf"]["q8_0"]
    assert gguf["passed"] and gguf["quantized_tensors"] > 0  # the language model, checked tensor by tensor
    projector = gguf["mmproj"]  # the vision encoder and projector, for llama.cpp's --mmproj
    assert projector["passed"] and projector["tensors"] == projector["exact_tensors"] > 0
    assert not projector["unmatched_tensors"] and (run.root / "gguf" / projector["file"]).is_file()
    assert exported.info["replaced"] > 0  # the vision tower and projector, trained whole
    merged_dir = exported.out
    processor = AutoProcessor.from_pretrained(merged_dir)
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.float32).eval()
    recipe = validate_recipe(yaml.safe_load(run.resolved_recipe.read_text()))
    trained = load_trained_vision(recipe, run.root)
    from qlora_pipe.methods import method_for
    from qlora_pipe.models.loading import load_run_tokenizer

    data = method_for(recipe).prepare_data(recipe, load_run_tokenizer(run.root))
    rows = [data.eval[i] for i in range(2)]
    answers = image_answers(merged, processor, rows, 4)
    assert answers == image_answers(trained, processor, rows, 4)

    # chat shows the picture with the question: the same greedy answer from the run and from the merged folder
    from qlora_pipe.evaluate.chat import run_chat

    first = json.loads((shapes / "eval.jsonl").read_text().splitlines()[0])["messages"][0]["content"]
    flags = {"max_new_tokens": 4, "temperature": None, "top_p": None, "greedy": True}
    for folder in (run.root, merged_dir):
        capsys.readouterr()
        run_chat(str(folder), first[1]["text"], "", flags, image_path=str(shapes / first[0]["path"]))
        assert capsys.readouterr().out.strip() == answers[0]
    assert_one_line_error(
        cli("chat", str(merged_dir), "--prompt", "hi", "--image", str(shapes / "nowhere.png")), "nowhere.png", "missing"
    )

    # eval: the held-out image questions, base (adapter and trained vision parts off) against the merged export
    from qlora_pipe.vision.answers import run_vision_eval

    evaluated = run_vision_eval(run, recipe, None, 2, merged=True)
    assert evaluated["after"]["rows"] == evaluated["before"]["rows"] == 2
    assert evaluated["before"]["examples"] != evaluated["after"]["examples"]  # the trained parts are switched off
    assert json.loads((merged_dir / "eval.json").read_text())["tuned_model"] == "merged model"
