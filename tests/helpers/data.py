"""Helpers shared by the data-stage tests: small files in every format, decoding, fixtures."""

from __future__ import annotations

import csv
import json

from qlora_pipe.data.prepare import prepare_data
from qlora_pipe.data.prepared import IGNORE
from qlora_pipe.recipe import DataSection

QA = [("What is a tort?", "A civil wrong."), ("What is a lien?", "A claim on property."), ("Define bail.", "Security.")]


def chat(question: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def write_jsonl(path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_parquet(path, rows) -> str:
    from datasets import Dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def write_csv(path, rows, fieldnames) -> str:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def texts(dataset, tokenizer) -> list[str]:
    return [tokenizer.decode(ids) for ids in dataset["input_ids"]]


def trained_texts(dataset, tokenizer) -> list[str]:
    return [
        tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE])
        for ids, labels in zip(dataset["input_ids"], dataset["labels"], strict=True)
    ]


def rendered(tokenizer, messages) -> str:
    return tokenizer.decode(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def prepare(tmp_path, tokenizer, seed: int = 42, cache: str = "cache", **data):
    return prepare_data(DataSection(cache_dir=str(tmp_path / cache), **data), tokenizer, seed)


# ---------------------------------------------------------------------------------------------
# 1. File types, directories and globs


def numbered(prefix: str, count: int) -> list[dict]:
    return [chat(f"{prefix} question {i}?", f"{prefix} answer {i}.") for i in range(count)]


def answers(dataset, tokenizer) -> list[str]:
    return [t.removesuffix("<|im_end|>") for t in trained_texts(dataset, tokenizer)]


LLAMA_3_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>"]


def add_llama_3_tokens(tokenizer) -> None:
    """The tiny tokenizer gains Llama 3's header, end-of-turn and BOS tokens (for its chat templates)."""
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA_3_TOKENS})
    tokenizer.bos_token = "<|begin_of_text|>"
