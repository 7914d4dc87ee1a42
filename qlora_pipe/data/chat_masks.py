"""One conversation rendered with its chat template and masked, part by part.

The template's {% generation %} markers decide what the assistant says (trained) and what it reads
(masked). On top of that, located in the rendered text by character offsets:

- tool calls are trained with the turn that makes them; tool results and the tools list are context;
- reasoning follows data.reasoning: ``train`` keeps it in the loss, ``mask`` keeps it as context only
  (its ``<think>`` tags included), ``drop`` removes it before rendering;
- an empty ``<think></think>`` block that a template adds to a turn without reasoning is never trained:
  a model trained on it learns to skip thinking. It stays in the text (it is what the template serves).

Each row also gets counts for the data report and marks for the preview.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from qlora_pipe.data.conversation import has_tools
from qlora_pipe.data.template_errors import is_refusal, template_failure
from qlora_pipe.data.turn_spans import TurnFormat, assistant_spans, span_mask
from qlora_pipe.errors import UserError

log = logging.getLogger(__name__)

EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")
THINK_OPEN, THINK_CLOSE = re.compile(r"<think>\s*$"), re.compile(r"^\s*</think>\s*")
REASONING_PROBE, EARLIER_PROBE = "\u2063reasoning-probe\u2063", "\u2063earlier-probe\u2063"
TOOL_PROBE = {"name": "probe_function_x7", "argument": "probe_argument_y3", "result": "probe_result_z5"}


@dataclass(frozen=True)
class TemplateTraits:
    """What a chat template does with tools and reasoning, found by rendering probe conversations."""

    renders_tools: bool
    renders_reasoning: bool
    renders_earlier_reasoning: bool  # reasoning of turns before the last user message
    adds_empty_think: bool
    # A bug the template hit on the tools or reasoning probe (its error and line), named when rows need that part
    tools_failure: str | None = None
    reasoning_failure: str | None = None


@dataclass
class Encoded:
    input_ids: list[int]
    mask: list[int]
    counts: dict[str, int] = field(default_factory=dict)
    marks: list[tuple[int, str]] = field(default_factory=list)  # (token index, label) for the preview


def render(tokenizer, messages, tools, template) -> str:
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template, **extra)


def probe_template(tokenizer, template: str | None) -> TemplateTraits:
    """Render small conversations with sentinel texts and see which of them come out."""
    user = {"role": "user", "content": "q"}
    call = {"type": "function", "function": {"name": TOOL_PROBE["name"], "arguments": {TOOL_PROBE["argument"]: 1}}}
    tools = [{"type": "function", "function": {"name": TOOL_PROBE["name"], "parameters": {"type": "object"}}}]
    tool_turns = [user, {"role": "assistant", "content": "", "tool_calls": [call]}]
    tool_turns.append({"role": "tool", "name": TOOL_PROBE["name"], "content": TOOL_PROBE["result"]})
    try:
        listed = TOOL_PROBE["name"] in render(tokenizer, [user], tools, template)  # the functions, before any call
        text = render(tokenizer, [*tool_turns, {"role": "assistant", "content": "a"}], tools, template)
        renders_tools = listed and all(value in text for value in TOOL_PROBE.values())
    except Exception as exc:  # templates that reject the tool role or tool_calls (jinja raises many types)
        renders_tools, tools_failure = False, _bug(exc)
    else:
        tools_failure = None
    thinking = {"role": "assistant", "content": "a", "reasoning_content": REASONING_PROBE}
    earlier = {"role": "assistant", "content": "a", "reasoning_content": EARLIER_PROBE}
    try:
        text = render(tokenizer, [user, earlier, user, thinking], None, template)
        plain = render(tokenizer, [user, {"role": "assistant", "content": "a"}], None, template)
    except Exception as exc:  # a template that insists on its own turn order: it renders no reasoning we can see
        text = plain = ""
        reasoning_failure = _bug(exc)
    else:
        reasoning_failure = None
    empty_think = bool(EMPTY_THINK.search(plain))
    found = (REASONING_PROBE in text, EARLIER_PROBE in text, empty_think)
    return TemplateTraits(renders_tools, *found, tools_failure=tools_failure, reasoning_failure=reasoning_failure)


def _bug(exc: Exception) -> str | None:
    """The template's own error and line when a probe hit a bug in it (not a deliberate refusal)."""
    return None if is_refusal(exc) else template_failure(exc)


def encode_conversation(
    example: dict[str, Any], tokenizer, template: str | None, data, empty_think: bool, turns: TurnFormat | None = None
) -> Encoded:
    """input_ids, the loss mask (data.loss_on), the row's counts and its preview marks. ``empty_think``: the
    template adds empty thinking blocks, so every row is searched for them. ``turns``: the template has no
    {% generation %} markers; its assistant turns are located by offsets (data/turn_spans.py)."""
    messages, tools = example["messages"], example.get("tools")
    counts = {"reasoning_turns": sum(1 for m in messages if m.get("reasoning_content"))}
    if data.reasoning == "drop" and counts["reasoning_turns"]:
        counts["reasoning_dropped"] = counts["reasoning_turns"]
        messages = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]
    extra = {"tools": tools} if tools else {}
    if data.loss_on == "all":
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **extra)["input_ids"]
        mask = [1] * len(ids)
    elif turns is not None:
        ids, mask = located_mask(tokenizer, messages, tools, template, turns)
    else:
        out = tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            chat_template=template,
            **extra,
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if data.loss_on == "completion":
        mask = last_run_only(mask)
    encoded = Encoded(list(ids), mask, counts)
    if not (has_tools(example) or counts["reasoning_turns"] or empty_think):
        return encoded
    text, starts = rendered_offsets(tokenizer, messages, tools, template if data.loss_on != "all" else None, ids)
    _Locator(text, starts, encoded, data.reasoning).walk(messages)
    return encoded


def rendered_offsets(tokenizer, messages, tools, template, ids: list[int]) -> tuple[str, list[int]]:
    """The rendered text and each token's first character; the tokens must be the ones training gets."""
    text = render(tokenizer, messages, tools, template)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(offsets["input_ids"]) != list(ids):  # a deterministic template cannot; never guess a mask
        raise ValueError("the chat template renders this row differently on two calls")
    return text, [start for start, _ in offsets["offset_mapping"]]


class TurnNotFound(ValueError):
    """An assistant turn of this row is not where the template's probes said it would be."""


def located_mask(tokenizer, messages, tools, template, turns: TurnFormat) -> tuple[list[int], list[int]]:
    """Tokens of the rendered row and the mask of its assistant turns, found by character offsets."""
    extra = {"tools": tools} if tools else {}
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, chat_template=template, **extra)
    ids = list(ids["input_ids"])
    text = render(tokenizer, messages, tools, template)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(offsets["input_ids"]) != ids:
        raise TurnNotFound("the rendered text does not tokenize to the template's tokens")
    spans = assistant_spans(text, messages, turns)
    if spans is None:
        raise TurnNotFound("an assistant turn is not rendered verbatim")
    return ids, span_mask(spans, [tuple(o) for o in offsets["offset_mapping"]])


def last_run_only(mask: list[int]) -> list[int]:
    """Keep only the last contiguous run of ones: the final assistant answer."""
    out = [0] * len(mask)
    end = max((i for i, m in enumerate(mask) if m), default=-1)
    i = end
    while i >= 0 and mask[i]:
        out[i] = 1
        i -= 1
    return out


def check_template_for(traits: TemplateTraits, examples: list[dict[str, Any]], data) -> bool:
    """Refuse rows the template cannot render; say what it does with reasoning. Returns whether every row
    must be searched for empty thinking blocks."""
    tools = sum(1 for e in examples if has_tools(e))
    thinking = sum(1 for e in examples if any(m.get("reasoning_content") for m in e.get("messages") or []))
    if tools and not traits.renders_tools:
        raise UserError(
            f"data: {tools} rows have tools or tool calls, but the chat template does not render them (tools list, "
            "tool_calls, tool turns); set data.chat_template: chatml, llama-3 or mistral, or a template with tools"
            + (f" (it fails on a conversation with tools: {traits.tools_failure})" if traits.tools_failure else "")
        )
    if thinking and data.reasoning != "drop" and not traits.renders_reasoning:
        raise UserError(
            f"data.reasoning: {data.reasoning}: {thinking} rows have reasoning, but the chat template does not render "
            "reasoning_content; set data.chat_template: chatml or llama-3, or data.reasoning: drop"
            + (
                f" (it fails on a conversation with reasoning: {traits.reasoning_failure})"
                if traits.reasoning_failure
                else ""
            )
        )
    if thinking and data.reasoning != "drop" and not traits.renders_earlier_reasoning:
        log.info("data: the chat template keeps only the reasoning after the last user message, as it is served")
    if traits.adds_empty_think:
        log.warning(
            "data: the chat template adds an empty <think></think> block to answers without reasoning; it stays as "
            "context and is never trained (trained, it would teach the model to skip thinking)"
        )
    return traits.adds_empty_think


class _Locator:
    """Finds each message's parts in the rendered text, in order, and adjusts the mask around them."""

    def __init__(self, text: str, starts: list[int], encoded: Encoded, reasoning: str):
        self.text, self.starts, self.encoded, self.reasoning, self.cursor = text, starts, encoded, reasoning, 0

    def tokens(self, begin: int, end: int) -> list[int]:
        return [i for i, s in enumerate(self.starts) if begin <= s < end]

    def find(self, piece: str) -> tuple[int, int] | None:
        piece = piece.strip()
        at = self.text.find(piece, self.cursor) if piece else -1
        if at < 0:
            return None
        self.cursor = at + len(piece)
        return at, at + len(piece)

    def mark(self, span: tuple[int, int], label: str) -> bool:
        """Add a preview mark at the span's first token; returns whether that token is trained."""
        tokens = self.tokens(*span)
        if not tokens:
            return False
        trained = bool(self.encoded.mask[tokens[0]])
        self.encoded.marks.append((tokens[0], f"{label}, {'trained' if trained else 'masked'}"))
        return trained

    def count(self, key: str) -> None:
        self.encoded.counts[key] = self.encoded.counts.get(key, 0) + 1

    def walk(self, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            if message.get("reasoning_content"):
                self.reasoning_span(message["reasoning_content"])
            span = self.find(message["content"])
            if message["role"] == "tool" and span is not None:
                self.count("tool_results_trained" if self.mark(span, "tool result") else "tool_results_masked")
            for call in message.get("tool_calls", []):
                span = self.find(call["function"]["name"])
                if span is not None:
                    self.count("tool_calls_trained" if self.mark(span, "tool call") else "tool_calls_masked")
        for match in EMPTY_THINK.finditer(self.text):
            trained = [t for t in self.tokens(match.start(), match.end()) if self.encoded.mask[t]]
            for t in trained:
                self.encoded.mask[t] = 0
            if trained:
                self.count("empty_think_masked")

    def reasoning_span(self, reasoning: str) -> None:
        span = self.find(reasoning)
        if span is None:
            self.count("reasoning_not_rendered")
            return
        begin, end = span
        opener = THINK_OPEN.search(self.text, 0, begin)
        if opener is not None:
            begin = opener.start()
        closer = THINK_CLOSE.match(self.text[end:])
        if closer is not None:
            end = self.cursor = end + closer.end()
        if self.reasoning == "mask":
            for t in self.tokens(begin, end):
                self.encoded.mask[t] = 0
        self.count("reasoning_masked" if not self.mark((begin, end), "reasoning") else "reasoning_trained")
