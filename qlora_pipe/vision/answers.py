"""Greedy answers to held-out image questions, and their scores against the reference answers.

A held-out row is cut where its trained tokens begin: before that is the question with its image tokens
(exactly as training saw it), after it the reference answer. One row per generate call, so no answer depends
on another row's padding or images. Scores: exact match and token F1 (evaluate/metrics.py), and the
baseline a model that never looks at the image can reach: always the training data's most frequent answer.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from qlora_pipe.data.prepared import IGNORE
from qlora_pipe.evaluate.metrics import score_answers
from qlora_pipe.vision.collate import IMAGE_COLUMN, pixel_inputs, token_type_inputs

VISION_EVAL = "vision_eval.json"
ANSWER_TOKENS = 256  # at most
ANSWER_SLACK = 4  # tokens beyond the longest reference answer


def question_and_answer(row: dict[str, Any], tokenizer) -> tuple[list[int], str]:
    """The prompt ids (up to the first trained token) and the reference answer's text."""
    labels = row["labels"]
    start = next(i for i, label in enumerate(labels) if label != IGNORE)
    end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE), len(labels))
    return row["input_ids"][:start], tokenizer.decode(row["input_ids"][start:end], skip_special_tokens=True).strip()


@torch.no_grad()
def image_answers(model, processor, rows, max_new_tokens: int = ANSWER_TOKENS) -> list[str]:
    """The model's greedy answers to the rows' questions (each with its images)."""
    from qlora_pipe.models.generation import GenerationSettings, stop_token_ids, to_generation
    from qlora_pipe.terminal import progress_bar

    tokenizer = processor.tokenizer
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    kwargs = GenerationSettings(max_new_tokens).generate_kwargs(stops, tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    answers = []
    try:
        with progress_bar(total=len(rows), desc="image answers", unit="answer", leave=False) as bar:
            for row in rows:
                prompt, _ = question_and_answer(row, tokenizer)
                ids = torch.tensor([prompt], device=model.device)
                extra = {**pixel_inputs(processor, [row[IMAGE_COLUMN]]), **token_type_inputs(processor, ids)}
                pixels = {k: v.to(model.device) for k, v in extra.items()}
                out = model.generate(  # the KV cache, whatever training's checkpointing set in the config
                    input_ids=ids, attention_mask=torch.ones_like(ids), **pixels, **kwargs, use_cache=True
                )
                answers.append(to_generation(tokenizer, out[0, ids.shape[1] :].tolist(), stops).text)
                bar.update(1)
    finally:
        model.train(was_training)
    return answers


def most_frequent_answer(train, tokenizer) -> str:
    """The training data's most frequent reference answer (ties: the first seen)."""
    counts = Counter(question_and_answer(row, tokenizer)[1] for row in train)
    return counts.most_common(1)[0][0] if counts else ""


def image_scores(model, processor, rows, baseline_answer: str) -> dict[str, Any]:
    """Exact match and token F1 of the model's answers, with the most-frequent-answer baseline's. Answers may
    run to the longest reference answer's length and a few tokens more."""
    references = [question_and_answer(row, processor.tokenizer)[1] for row in rows]
    longest = max((sum(label != IGNORE for label in row["labels"]) for row in rows), default=0)
    answers = image_answers(model, processor, rows, min(ANSWER_TOKENS, longest + ANSWER_SLACK))
    return {
        **score_answers(answers, references),
        "rows": len(rows),
        "baseline": {"answer": baseline_answer, **score_answers([baseline_answer] * len(rows), references)},
        "examples": [{"reference": r, "answer": a} for r, a in list(zip(references, answers, strict=True))[:8]],
    }


def read_scores(run_root: Path) -> dict[str, Any]:
    path = run_root / VISION_EVAL
    return json.loads(path.read_text()) if path.is_file() else {}


def scores_table(result: dict[str, Any]) -> str:
    """Held-out image questions: exact match and token F1 before and after, with the baseline."""
    before, after = result.get("before", {}), result.get("after", {})
    baseline = (after or before).get("baseline", {})
    lines = [f"{'held-out image questions':<34}{'before':>10}{'after':>10}{'baseline':>10}"]
    for label, key in (("exact match", "exact_match"), ("token F1", "token_f1")):
        cells = [f"{d[key]:.1%}" if key in d else "-" for d in (before, after, baseline)]
        lines.append(f"{label:<34}{cells[0]:>10}{cells[1]:>10}{cells[2]:>10}")
    if baseline:
        lines.append(f"(baseline: always {baseline['answer']!r}, the most frequent training answer)")
    return "\n".join(lines)


def run_vision_eval(run, recipe, data_path: str | None, limit: int | None, merged: bool) -> dict[str, Any]:
    """`qlora-pipe eval RUN` for a vision run: held-out image questions answered by the base (the adapter and
    the trained vision parts switched off) and by the tuned model (or the merged export), with the baseline."""
    import time

    from transformers import AutoProcessor

    from qlora_pipe.errors import UserError
    from qlora_pipe.models.loading import load_run_tokenizer
    from qlora_pipe.runs import write_json_atomic
    from qlora_pipe.vision.data import prepare_vision_data
    from qlora_pipe.vision.model import load_trained_vision

    started = time.time()
    tokenizer = load_run_tokenizer(run.root)
    processor = AutoProcessor.from_pretrained(str(run.root))
    processor.tokenizer = tokenizer
    section = recipe.data if data_path is None else recipe.data.model_copy(update={"eval_path": data_path})
    data = prepare_vision_data(section, processor, recipe.seed)
    if data.eval is None or not len(data.eval):
        raise UserError(f"eval {run.root}: no held-out image rows (give --data FILE or data.eval_path)")
    rows = [data.eval[i] for i in range(min(limit or len(data.eval), len(data.eval)))]
    baseline = most_frequent_answer(data.train, tokenizer)
    model = load_trained_vision(recipe, run.root)
    with model.disable_adapter():
        columns = {"before": image_scores(model, processor, rows, baseline)}
    if merged:
        from transformers import AutoModelForImageTextToText

        del model
        model = AutoModelForImageTextToText.from_pretrained(str(run.root / "merged")).eval()
    columns["after"] = image_scores(model, processor, rows, baseline)
    result = {"run": str(run.root), "task": "vision", "data": data_path or "held-out rows", **columns}
    result["tuned_model"] = "merged model" if merged else "4-bit base + adapter"
    out = (run.root / "merged" / run.eval_report.name) if merged else run.eval_report
    write_json_atomic(out, result)
    return {**result, "path": str(out), "seconds": time.time() - started}
