"""Tool-calling and reasoning rows shared by the tool tests, and the tiny tokenizer set up per template family.

Families: our built-in chatml, llama-3 and mistral, and Qwen2.5, Qwen3 and Llama 3.1 as released (their
templates as TRL stores them to recognize the families).
"""

from __future__ import annotations

from pathlib import Path

from qlora_pipe.data.chat_templates import select_chat_template
from qlora_pipe.data.prepare import prepare_data
from qlora_pipe.data.prepared import IGNORE
from qlora_pipe.recipe import DataSection
from tests.helpers.data import add_llama_3_tokens, write_jsonl

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "find_statute",
            "description": "Look up a statute by topic.",
            "parameters": {"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "compute_deadline",
            "description": "Add days to a date.",
            "parameters": {"type": "object", "properties": {"start": {"type": "string"}, "days": {"type": "integer"}}},
        },
    },
]
CALL = {"type": "function", "function": {"name": "compute_deadline", "arguments": {"start": "2026-03-02", "days": 30}}}
RESULT = "DEADLINE-2026-04-01"
TOOL_ROW = {
    "tools": TOOLS,
    "messages": [
        {"role": "user", "content": "When is my reply due if served on 2026-03-02?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "name": "compute_deadline", "content": RESULT},
        {"role": "assistant", "content": "Your reply is due on 1 April 2026."},
    ],
}
THOUGHT = "The service date starts a thirty day clock."
THINK_ROW = {
    "messages": [
        {"role": "user", "content": "How long do I have to answer?"},
        {"role": "assistant", "content": "Thirty days.", "reasoning_content": THOUGHT},
    ]
}
EARLIER, LATER = "First I recall the rule on service.", "Now I count the days from service."
MULTI_TURN = {
    "messages": [
        {"role": "user", "content": "What starts the clock?"},
        {"role": "assistant", "content": "Service of the complaint.", "reasoning_content": EARLIER},
        {"role": "user", "content": "And how long is it?"},
        {"role": "assistant", "content": "Thirty days.", "reasoning_content": LATER},
    ]
}
FAMILIES = ["chatml", "llama-3", "mistral", "qwen2.5", "qwen3", "llama-3.1"]
END_OF_TURN = {"chatml": "<|im_end|>", "qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>"}
END_OF_TURN.update({"llama-3": "<|eot_id|>", "llama-3.1": "<|eot_id|>", "mistral": "</s>"})


def released_template(name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()


def with_family(tokenizer, family: str):
    if family.startswith("llama-3"):
        add_llama_3_tokens(tokenizer)
    if family == "mistral":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<s>", "</s>"]})
    if family in ("chatml", "llama-3", "mistral"):
        select_chat_template(tokenizer, family)
        if family == "mistral":
            tokenizer.eos_token, tokenizer.bos_token = "</s>", "<s>"
    else:
        tokenizer.chat_template = released_template(
            {"qwen2.5": "qwen2_5", "qwen3": "qwen3", "llama-3.1": "llama3_1"}[family]
        )
    return tokenizer


def prepare(tmp_path, tokenizer, rows, **data):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    section = DataSection(train_path=path, cache_dir=str(tmp_path / "cache"), **data)
    return prepare_data(section, tokenizer)


def split(prepared, tokenizer, index: int = 0) -> tuple[str, str, str]:
    """(whole text, trained tokens decoded together, masked tokens decoded together) of one prepared row."""
    ids, labels = prepared.train["input_ids"][index], prepared.train["labels"][index]
    trained, masked = [], []
    for token, label in zip(ids, labels, strict=True):
        (trained if label != IGNORE else masked).append(token)
    return tokenizer.decode(ids), tokenizer.decode(trained), tokenizer.decode(masked)
