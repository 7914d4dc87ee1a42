"""Recipes (as dicts before validation, or validated) for the methods and tasks beside SFT, on the bundled data or
rows written for the test: DPO on preference pairs, GRPO on prompts with built-in and user rewards, and a
classifier on labelled rows."""

from __future__ import annotations

import json
from pathlib import Path

from qlora_pipe.recipe import validate_recipe
from tests.conftest import REPO, recipe_dict

PAIRS_TRAIN = REPO / "data/legal-qa/preference_train.jsonl"


def dpo_recipe(model_dir: Path, tmp_path: Path, name: str = "dpo", eval_path: Path = PAIRS_TRAIN, **training):
    raw = recipe_dict(model_dir, tmp_path / "runs", **training)
    raw.update(run_name=name, method="dpo", preference={"beta": 0.1})
    raw["data"].update(train_path=str(PAIRS_TRAIN), eval_path=str(eval_path), max_train_samples=16, max_eval_samples=16)
    return raw


PROMPTS_TRAIN = REPO / "data/legal-qa/grpo_train.jsonl"
PROMPTS_EVAL = REPO / "data/legal-qa/grpo_eval.jsonl"
FORMAT = r"Area: ([a-z ]+)\.?"
USER_REWARDS = '''
def mentions_area(completions, answer, **kwargs):
    """1 when the answer names the row's area anywhere."""
    return [float(a in c[0]["content"]) for c, a in zip(completions, answer)]


def broken(completions, prompts, **kwargs):
    return [1 / 0 if "offer" in p[-1]["content"] else 0.0 for p in prompts]


def text_score(completions, **kwargs):
    return ["high" for _ in completions]


def letters(completions, **kwargs):
    """Varies with the sampled text even on a random model, so the advantages are not all zero."""
    return [c[0]["content"].count("e") / 10 for c in completions]


def no_kwargs(completions):
    return [0.0 for _ in completions]
'''


def user_rewards(tmp_path: Path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def grpo_recipe(model_dir: Path, tmp_path: Path, name: str = "grpo", rewards: list | None = None, **training):
    raw = recipe_dict(model_dir, tmp_path / "runs", **training)
    raw.update(run_name=name, method="grpo")
    raw["grpo"] = {
        "num_generations": 4,
        "max_completion_length": 8,
        "beta": 0.04,
        "rewards": rewards
        or [
            {"function": "regex", "pattern": FORMAT, "name": "format", "weight": 0.5},
            {"function": "exact_match", "pattern": FORMAT, "name": "area"},
            {"function": f"{user_rewards(tmp_path)}:mentions_area"},
            {"function": "length", "max_tokens": 6, "weight": 0.1},
        ],
    }
    raw["data"].update(
        train_path=str(PROMPTS_TRAIN), eval_path=str(PROMPTS_EVAL), max_train_samples=8, max_eval_samples=4
    )
    raw["training"].update(micro_batch_size=4, gradient_accumulation_steps=1)
    return raw


WORDS = {
    "contracts": ["contract", "offer", "acceptance", "consideration"],
    "criminal": ["crime", "theft", "arrest", "prosecution"],
    "property": ["land", "lease", "easement", "tenant"],
}
TRAIN_TEMPLATES = ["Tell me about the {}.", "What does {} mean?", "A question on {} for you."]
HELD_OUT_TEMPLATES = ["Explain the idea of {} simply.", "Is {} important here?"]  # unseen wordings


def write_rows(tmp_path: Path) -> tuple[Path, Path]:
    train = [{"text": t.format(w), "label": k} for k, ws in WORDS.items() for w in ws for t in TRAIN_TEMPLATES]
    train += [{"text": " ", "label": "criminal"}, {"text": "No label here."}]  # dropped with their reasons
    held_out = [{"text": t.format(w), "label": k} for k, ws in WORDS.items() for w in ws for t in HELD_OUT_TEMPLATES]
    held_out.append({"text": "What is a tax?", "label": "tax"})  # a class the training data never had
    paths = tmp_path / "topics_train.jsonl", tmp_path / "topics_eval.jsonl"
    for path, rows in zip(paths, (train, held_out), strict=True):
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return paths


def classifier_recipe(model_dir: Path, tmp_path: Path, name: str, **training):
    train, held_out = write_rows(tmp_path)
    raw = recipe_dict(model_dir, tmp_path / "runs", **{"learning_rate": 1e-2, "micro_batch_size": 8, **training})
    raw.update(run_name=name, task="classification")
    raw["quantization"] = {"compute_dtype": "float32"}
    raw["training"]["precision"] = "fp32"
    raw["data"].update(train_path=str(train), eval_path=str(held_out), max_length=32)
    raw["data"].update(max_train_samples=None, max_eval_samples=None)
    return validate_recipe(raw)
