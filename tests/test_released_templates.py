"""Assistant-only loss on released chat templates without {% generation %} markers, token by token.

Each template is used as released (TRL's stored copies of the released texts, and SmolLM2-135M-Instruct's as
read from its GGUF file), on the tiny tokenizer given the template's special tokens. The assistant turns are
located by offsets (data/turn_spans.py): each answer and the end-of-turn token after it are trained, and
nothing else: not the system prompt a template injects, not the headers, not the empty thinking blocks some
templates add. Where TRL keeps a training copy with markers, its mask must contain ours.
"""

from __future__ import annotations

import re
from itertools import groupby
from pathlib import Path

import pytest
import trl

from qlora_pipe.data.chat_masks import encode_conversation, probe_template
from qlora_pipe.data.prepare import masking_plan, prepare_data
from qlora_pipe.data.prepared import IGNORE
from qlora_pipe.data.turn_spans import probe_turns
from qlora_pipe.errors import UserError
from qlora_pipe.recipe import DataSection
from tests.helpers.data import write_jsonl

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
OURS = Path(__file__).parent / "templates"
SPECIAL = re.compile(
    r"<[｜|][^<>\s]{1,30}?[｜|]>|<(?:start|end)_of_turn>|<\|[A-Za-z_]+\|>|\[/?INST\]|<(?:s|/s|bos|eos)>"
)
# name -> (end-of-turn token, whether the template refuses a system message); PREFIX: what a template writes in
# the assistant's turn before the answer (trained with it, as TRL's marked copy does)
RELEASED = {
    "cohere": ("<|END_OF_TURN_TOKEN|>", False),
    "deepseek_r1_distill": ("<｜end▁of▁sentence｜>", False),
    "deepseekv3": ("<｜end▁of▁sentence｜>", False),
    "gemma": ("<end_of_turn>", True),
    "gemma3": ("<end_of_turn>", False),
    "lfm2": ("<|im_end|>", False),
    "llama3": ("<|eot_id|>", False),
    "muse_glimmer": ("<|eot|>", False),
    "nemotron_3_nano": ("<|im_end|>", False),
    "phi3": ("<|end|>", False),
    "phi3_5": ("<|end|>", False),
    "qwen2_5": ("<|im_end|>", False),
    "qwen3_instruct_2507": ("<|im_end|>", False),
    "qwen3_8": ("<|im_end|>", False),
    "smollm2-135m-instruct": ("<|im_end|>", False),
}
PREFIX = {"muse_glimmer": "to=user<|message|>"}
ANSWERS = ("A civil wrong.", "A claim on property.")


def conversation(system: bool) -> list[dict[str, str]]:
    turns = [
        {"role": "user", "content": "What is a tort?"},
        {"role": "assistant", "content": ANSWERS[0]},
        {"role": "user", "content": "And a lien?"},
        {"role": "assistant", "content": ANSWERS[1]},
    ]
    return ([{"role": "system", "content": "Be brief."}] if system else []) + turns


def template_text(name: str) -> str:
    path = OURS / f"{name}.jinja"
    return (path if path.is_file() else TRL_TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def with_released(tokenizer, name: str) -> str:
    template = template_text(name)
    tokenizer.add_special_tokens({"additional_special_tokens": sorted(set(SPECIAL.findall(template)))})
    tokenizer.bos_token = tokenizer.bos_token or "<|endoftext|>"
    tokenizer.chat_template = template
    return template


def runs(ids, mask, tokenizer) -> list[str]:
    out = []
    for trained, run in groupby(zip(ids, mask, strict=True), key=lambda pair: bool(pair[1])):
        if trained:
            out.append(tokenizer.decode([t for t, _ in run]))
    return out


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_template_trains_each_answer_and_its_end_of_turn(tokenizer, name):
    template = with_released(tokenizer, name)
    eot, no_system = RELEASED[name]
    turns = probe_turns(tokenizer, template)
    assert turns.end_of_turn == eot
    empty_think = probe_template(tokenizer, template).adds_empty_think
    data = DataSection(train_path="unused.jsonl")
    messages = conversation(system=not no_system)
    encoded = encode_conversation({"messages": messages}, tokenizer, template, data, empty_think, turns)
    trained = runs(encoded.input_ids, encoded.mask, tokenizer)
    prefix = PREFIX.get(name, "")
    assert [t.strip() for t in trained] == [f"{prefix}{ANSWERS[0]}{eot}", f"{prefix}{ANSWERS[1]}{eot}"]
    masked = tokenizer.decode([t for t, m in zip(encoded.input_ids, encoded.mask, strict=True) if not m])
    assert "What is a tort?" in masked and "And a lien?" in masked
    training_copy = TRL_TEMPLATES / f"{name}_training.jinja"
    if training_copy.is_file():  # TRL's marked copy trains at least what we do (it may add the header or a newline)
        out = tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            chat_template=training_copy.read_text(encoding="utf-8"),
        )
        if list(out["input_ids"]) == encoded.input_ids:
            assert all(m for m, ours in zip(out["assistant_masks"], encoded.mask, strict=True) if ours)


def test_smollm2_template_through_the_data_stage_with_its_default_system_prompt(tokenizer, tmp_path):
    with_released(tokenizer, "smollm2-135m-instruct")
    tokenizer.eos_token = "<|endoftext|>"  # the end-of-turn token becomes the EOS
    rows = [{"messages": conversation(system=False)[:2]}, {"messages": conversation(system=True)}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    prepared = prepare_data(DataSection(train_path=path, cache_dir=str(tmp_path / "cache")), tokenizer)
    assert tokenizer.eos_token == "<|im_end|>"
    report = prepared.reports[0]
    assert report.rows_kept == 2 and report.masking.startswith("assistant turns located by offsets")
    first = prepared.train[0]
    text = tokenizer.decode(first["input_ids"])
    assert "You are a helpful AI assistant named SmolLM" in text  # injected by the template, not trained
    trained = [t for t, label in zip(first["input_ids"], first["labels"], strict=True) if label != IGNORE]
    assert tokenizer.decode(trained) == f"{ANSWERS[0]}<|im_end|>"
    assert trained[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        (  # the answer is upper-cased: never rendered verbatim
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | upper }}<|im_end|>\n{% endfor %}",
            "not rendered verbatim",
        ),
        (  # no token closes an answer: the model could not learn to stop
            "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
            "not closed by a special token",
        ),
    ],
)
def test_template_whose_turns_cannot_be_located_is_refused_with_the_reason(tokenizer, template, reason):
    tokenizer.chat_template = template
    with pytest.raises(UserError, match=reason):
        masking_plan(tokenizer)
