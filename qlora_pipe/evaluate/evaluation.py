"""`qlora-pipe eval`: the base model and the tuned one side by side on held-out data.

One model load serves both columns: "base" is the 4-bit base with the adapter disabled (PEFT's
``disable_adapter``), "tuned" is base + adapter, or with ``merged`` the exported merged model.
Loss is measured on the reference answers with the masking training used; the generation scores
compare greedy answers with the references (exact match, token F1, ROUGE-L).
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qlora_pipe.data.prepared import IGNORE
from qlora_pipe.errors import UserError
from qlora_pipe.evaluate.lm_harness import parse_tasks
from qlora_pipe.evaluate.metrics import score_answers
from qlora_pipe.machine.hardware import load_dtype_for
from qlora_pipe.models.generation import Generation, generate_greedy
from qlora_pipe.recipe import Recipe
from qlora_pipe.rewards.tool_calls import score_tool_calls
from qlora_pipe.runs import EVAL_REPORT, write_json_atomic

log = logging.getLogger(__name__)

SENTINEL = "\u2063QUESTION\u2063"  # an invisible separator no template adds itself
EXTRA_NEW_TOKENS = 16  # default generation budget: the longest reference answer plus this


@dataclass
class EvalSet:
    source: str
    rows: list[dict[str, list[int]]]  # input_ids and labels, masked as in training
    prompts: list[list[int]] = field(default_factory=list)  # everything before the final answer
    references: list[str] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)
    longest_answer: int = 0
    limit: int | None = None  # the user's --limit, also applied per lm-eval task


def final_answer_span(labels: list[int]) -> tuple[int, int] | None:
    """Start and end of the last run of trained tokens (the final answer and its end-of-turn token)."""
    end = next((i + 1 for i in range(len(labels) - 1, -1, -1) if labels[i] != IGNORE), None)
    if end is None:
        return None
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return start, end


def user_turn_markers(tokenizer) -> tuple[str, str] | None:
    """The text the chat template puts around a user message (for showing the question)."""
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False)
    except Exception:  # templates that insist on a system turn or alternation: show the raw prompt instead
        return None
    before, found, after = rendered.partition(SENTINEL)
    end = after.strip()
    if not found or not end:
        return None
    before = before.rpartition(end)[2].lstrip()  # drop a default system turn the template inserted
    return before.removeprefix(tokenizer.bos_token or "\0"), end


def question_text(tokenizer, prompt: list[int], markers: tuple[str, str] | None) -> str:
    text = tokenizer.decode(prompt, skip_special_tokens=False)
    start = text.rfind(markers[0]) if markers else -1
    if start < 0:
        return tokenizer.decode(prompt, skip_special_tokens=True).strip()[-300:]
    start += len(markers[0])
    end = text.find(markers[1], start)
    return text[start : end if end >= 0 else None].strip()


def load_eval_set(recipe: Recipe, tokenizer, data_path: str | None, limit: int | None) -> EvalSet:
    """The recipe's held-out set (or a given file), tokenized and masked by the data stage."""
    from qlora_pipe.data.prepare import prepare_data

    data = recipe.data
    if data_path is not None:
        if not any(ch in data_path for ch in "*?[") and not Path(data_path).expanduser().exists():
            raise UserError(f"eval: data file not found: {data_path}")
        # The whole file (up to --limit): the recipe's max_eval_samples was about training's held-out set.
        update = {"eval_path": data_path, "eval_sources": [], "eval_fraction": 0.0, "max_eval_samples": None}
        data = data.model_copy(update=update)
    elif not data.has_eval():
        raise UserError("eval: the run's recipe has no held-out data (data.eval_path); pass --data PATH")
    prepared = prepare_data(data, tokenizer, recipe.seed)
    if prepared.eval is None or len(prepared.eval) == 0:
        raise UserError(f"eval: no usable held-out rows in {data_path or 'the recipe held-out data'}")
    rows = [prepared.eval[i] for i in range(min(limit or len(prepared.eval), len(prepared.eval)))]
    evalset = EvalSet(data_path or "the recipe's held-out set", rows, limit=limit)
    markers = user_turn_markers(tokenizer)
    for row in rows:
        span = final_answer_span(row["labels"])
        if span is None or span[0] == 0:  # plain text or loss on every token: no question to answer
            continue
        prompt = row["input_ids"][: span[0]]
        evalset.prompts.append(prompt)
        evalset.references.append(tokenizer.decode(row["input_ids"][span[0] : span[1]], skip_special_tokens=True))
        evalset.questions.append(question_text(tokenizer, prompt, markers))
        evalset.longest_answer = max(evalset.longest_answer, span[1] - span[0])
    return evalset


@torch.no_grad()
def answer_loss(model, rows: list[dict[str, list[int]]], batch_size: int, pad_id: int) -> dict[str, float]:
    """Mean cross-entropy over the trained (answer) tokens, right-padded batches; and its perplexity."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(row["input_ids"]) for row in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            n = len(row["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(row["input_ids"]), torch.tensor(row["labels"]), 1
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        targets = labels[:, 1:].to(model.device)
        keep = targets != IGNORE
        total += torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum").item()
        count += int(keep.sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "answer_tokens": count}


def score_model(
    model,
    tokenizer,
    evalset: EvalSet,
    batch_size: int,
    max_new_tokens: int,
    name: str,
    lm_tasks: tuple[list[str], str | None] | None,
) -> tuple[dict[str, Any], list[Generation]]:
    """Loss on the references and scores of greedy answers (and lm-eval tasks), for one column of the table."""
    metrics: dict[str, Any] = answer_loss(model, evalset.rows, batch_size, tokenizer.pad_token_id)
    answers = generate_greedy(model, tokenizer, evalset.prompts, max_new_tokens, batch_size, desc=f"answers ({name})")
    metrics.update(score_answers([a.text for a in answers], evalset.references))
    metrics.update(score_tool_calls([a.text for a in answers], evalset.references))
    n = max(len(answers), 1)
    metrics["stopped_at_end_of_turn"] = sum(a.stopped for a in answers) / n
    metrics["mean_answer_tokens"] = sum(a.new_tokens for a in answers) / n
    if lm_tasks:
        from qlora_pipe.evaluate.lm_harness import run_lm_eval

        names, include = lm_tasks
        metrics["lm_eval"] = run_lm_eval(model, tokenizer, names, batch_size, evalset.limit, include)
    return metrics, answers


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the merged model is loaded next; give it the 4-bit model's memory


def _report(run_root: Path, evalset: EvalSet, tuned_model: str, max_new_tokens: int, base: tuple, tuned: tuple) -> dict:
    """eval.json: the settings, both columns of scores, and every answer side by side."""
    (base_scores, base_answers), (tuned_scores, tuned_answers) = base, tuned
    return {
        "run": str(run_root),
        "data": evalset.source,
        "tuned_model": tuned_model,
        "examples": len(evalset.rows),
        "generated": len(evalset.prompts),
        "max_new_tokens": max_new_tokens,
        "base": base_scores,
        "tuned": tuned_scores,
        "answers": [
            {"question": q, "reference": r, "base": b.text, "tuned": t.text}
            for q, r, b, t in zip(evalset.questions, evalset.references, base_answers, tuned_answers, strict=True)
        ],
    }


def run_eval(
    run_dir: str | Path,
    data: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    merged: bool = False,
    lm_eval_tasks: str | None = None,
    lm_eval_include: str | None = None,
) -> dict[str, Any]:
    """Evaluate base and tuned models of a finished run; writes eval.json (RUN_DIR/merged/eval.json with merged)."""
    from transformers import AutoModelForCausalLM

    from qlora_pipe.models.base_record import run_recipe
    from qlora_pipe.models.loading import load_run_tokenizer, load_trained_model, training_device
    from qlora_pipe.runs import resolve_run

    started = time.time()
    if batch_size < 1 or (limit is not None and limit < 1) or (max_new_tokens is not None and max_new_tokens < 1):
        raise UserError("eval: --batch-size, --limit and --max-new-tokens must be at least 1")
    if lm_eval_include and not lm_eval_tasks:
        raise UserError("eval --lm-eval-include: give the tasks to run with --lm-eval")
    lm_tasks = (parse_tasks(lm_eval_tasks, lm_eval_include), lm_eval_include) if lm_eval_tasks else None
    run = resolve_run(run_dir)
    merged_dir = run.root / "merged"
    if merged and not (merged_dir / "config.json").is_file():
        raise UserError(f"eval --merged: no merged model in {merged_dir}; run `qlora-pipe export {run.root}` first")
    recipe = run_recipe(run, "eval")
    from qlora_pipe.methods import method_for

    method = method_for(recipe)
    scored = method.held_out_eval(run, recipe, data, limit, batch_size, merged, lm_tasks is not None)
    if scored is not None:  # a method with its own held-out scores (classes, rewards, pairs), and its table
        return {**scored, "table": method.eval_table(scored)}
    tokenizer = load_run_tokenizer(run.root)
    evalset = load_eval_set(recipe, tokenizer, data, limit)
    max_new_tokens = max_new_tokens or evalset.longest_answer + EXTRA_NEW_TOKENS
    model = load_trained_model(recipe, run.root)
    with model.disable_adapter():
        base, base_answers = score_model(model, tokenizer, evalset, batch_size, max_new_tokens, "base", lm_tasks)
    if merged:
        del model
        _free_memory()
        dtype = load_dtype_for(merged_dir)  # fp32 on a CPU that emulates bf16
        model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype, device_map={"": training_device()})
    tuned, tuned_answers = score_model(model, tokenizer, evalset, batch_size, max_new_tokens, "tuned", lm_tasks)
    del model
    _free_memory()
    tuned_model = f"merged model ({merged_dir})" if merged else "4-bit base + adapter"
    result = _report(run.root, evalset, tuned_model, max_new_tokens, (base, base_answers), (tuned, tuned_answers))
    result["seconds"] = round(time.time() - started, 1)
    out = merged_dir / EVAL_REPORT if merged else run.eval_report
    write_json_atomic(out, result)
    result["path"] = str(out)
    return result
