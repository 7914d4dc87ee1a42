"""The preview: the training.preview_prompts answered before training (kept for resumed runs) and after."""

from __future__ import annotations

import json

from qlora_pipe.machine.dist import is_main_process, sharded_launch
from qlora_pipe.models.generation import generate_answers
from qlora_pipe.runs import write_json_atomic


def answers_before(recipe, run, model, tokenizer, data, resuming: bool) -> list[str]:
    """Preview answers of the untrained model; generated once and kept for resumed runs. The first process
    keeps them; under a sharded launch (FSDP, ZeRO-3) every process generates, in step: ZeRO-3 may have
    partitioned the weights at load, and transformers then synchronises every generation step across processes."""
    path = run.root / "baseline.json"
    if resuming and path.is_file():
        return json.loads(path.read_text())["answers"]
    prompts = recipe.training.preview_prompts
    if not prompts or not (is_main_process() or sharded_launch()):
        return []
    answers = generate_answers(model, tokenizer, prompts, data.system_prompt, recipe.training.preview_max_new_tokens)
    if is_main_process():
        write_json_atomic(path, {"answers": answers})
    return answers


def print_preview(rows: list[dict[str, str]]) -> None:
    print("\n=== answers before and after fine-tuning ===")
    for row in rows:
        print(f"\nQ: {row['prompt']}\n  before: {row['before']!r}\n  after:  {row['after']!r}")
    print()
