"""Assistant-only loss for a chat template without {% generation %} markers: the assistant turns are found in
the rendered text by character offsets and mapped to tokens with the fast tokenizer's offsets.

Most released instruct templates (SmolLM, Gemma, Phi, Mistral, many fine-tunes) have no markers. Before any
row is tokenized, probe conversations with sentinel texts prove what the template does: every assistant
content is rendered verbatim, each assistant turn is closed by one end-of-turn token (a special token right
after the content), and the assistant header (what the template writes before an answer, read off
``add_generation_prompt``) is known when there is one. A template that fails any of this is refused with
the reason. Each row is then rendered, and for every assistant message the span from the end of its header
(else the start of its content) to the end of its end-of-turn token is trained, as a {% generation %}
block around the turn would; tool calls rendered inside the turn are trained with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlora_pipe.data.template_errors import is_refusal, template_failure
from qlora_pipe.errors import UserError

SENTINELS = ("Sentinel answer one qx7.", "Sentinel answer two qx8.")
QUESTIONS = ("Sentinel question one qy7?", "Sentinel question two qy8?")
SYSTEM = "Sentinel system qz7."


@dataclass(frozen=True)
class TurnFormat:
    """What the probes found: the text that opens an assistant turn (may be empty) and the one that closes it."""

    header: str
    end_of_turn: str


def _render(tokenizer, template: str, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, chat_template=template, add_generation_prompt=generation_prompt
    )


def _probe_conversations(with_system: bool) -> list[list[dict[str, str]]]:
    one = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": SENTINELS[0]}]
    two = [*one, {"role": "user", "content": QUESTIONS[1]}, {"role": "assistant", "content": SENTINELS[1]}]
    system = [{"role": "system", "content": SYSTEM}]
    return [one, two, *([system + two] if with_system else [])]


def _special_tokens(tokenizer) -> list[str]:
    """Special and added tokens' texts, longest first (so '<|im_end|>' wins over a shorter prefix)."""
    texts = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}) or {})
    return sorted((t for t in texts if t), key=len, reverse=True)


def closing_token(tokenizer, tail: str) -> str | None:
    """The special token that opens ``tail`` after optional whitespace, or None."""
    stripped = tail.lstrip()
    return next((t for t in _special_tokens(tokenizer) if stripped.startswith(t)), None)


def probe_turns(tokenizer, template: str) -> TurnFormat:
    """Prove that this template's assistant turns can be located; raise UserError naming why not."""
    try:
        conversations = [_render(tokenizer, template, c) for c in _probe_conversations(True)]
    except Exception:  # jinja raises many types; several released templates refuse a system role
        try:
            conversations = [_render(tokenizer, template, c) for c in _probe_conversations(False)]
        except Exception as exc:
            failure = template_failure(exc)
            if failure is not None and not is_refusal(exc):  # a bug in the template, not a layout it refuses
                raise UserError(f"the chat template fails on a plain user/assistant conversation: {failure}") from exc
            raise _refusal(
                f"it fails on a plain user/assistant conversation ({failure or f'{type(exc).__name__}: {exc}'})"
            ) from exc
    closers = set()
    for text in conversations:
        cursor = 0
        for sentinel in SENTINELS[: 1 if SENTINELS[1] not in text else 2]:
            if text.count(sentinel) != 1:
                raise _refusal(f"an assistant message is not rendered verbatim once (probe {sentinel!r})")
            at = text.index(sentinel, cursor) + len(sentinel)
            closer = closing_token(tokenizer, text[at:])
            if closer is None:
                following = text[at : at + 20]
                raise _refusal(f"an assistant turn is not closed by a special token (after the answer: {following!r})")
            closers.add(closer)
            cursor = at
    if len(closers) != 1:
        raise _refusal(f"assistant turns end with different tokens ({', '.join(sorted(closers))})")
    return TurnFormat(_assistant_header(tokenizer, template), closers.pop())


def _assistant_header(tokenizer, template: str) -> str:
    """The text a template writes before every assistant answer: what add_generation_prompt appends, cut to
    the part that an answered turn also has (a generation prompt may open a thinking block that an answered
    turn closes or leaves out)."""
    prompt = [{"role": "user", "content": QUESTIONS[0]}]
    answered = [*prompt, {"role": "assistant", "content": SENTINELS[0]}]
    try:
        plain, opened = _render(tokenizer, template, prompt), _render(tokenizer, template, prompt, True)
        turn = _render(tokenizer, template, answered)
    except Exception:  # a template without a generation prompt of its own
        return ""
    if not (opened.startswith(plain) and turn.startswith(plain)):
        return ""
    header, following = opened[len(plain) :], turn[len(plain) : turn.index(SENTINELS[0])]
    common = 0
    while common < min(len(header), len(following)) and header[common] == following[common]:
        common += 1
    return header[:common]


def _refusal(reason: str) -> UserError:
    return UserError(
        "data.loss_on: the chat template has no {% generation %} markers and its assistant turns cannot be located: "
        f"{reason}; add the markers, choose data.chat_template, or set data.loss_on: all"
    )


def _located_text(message: dict[str, Any]) -> str:
    """The text a message is found by: its content, or for content parts (a vision row's) the assistant's text
    parts joined, another role's last text part (its images are rendered around it as placeholders)."""
    content = message.get("content") or ""
    if isinstance(content, list):
        texts = [part.get("text", "") for part in content if part.get("type") == "text"]
        content = "".join(texts) if message["role"] == "assistant" else (texts[-1] if texts else "")
    return content.strip()


def assistant_spans(text: str, messages: list[dict[str, Any]], turns: TurnFormat) -> list[tuple[int, int]] | None:
    """Character spans of the assistant turns in ``text`` (header end or content start, to the end of the
    end-of-turn token), found in message order; None when one cannot be located (the row is dropped)."""
    spans, cursor = [], 0
    for message in messages:
        content = _located_text(message)
        if message["role"] != "assistant":
            at = text.find(content, cursor) if content else -1
            cursor = at + len(content) if at >= 0 else cursor  # a template may leave a message out
            continue
        if content:
            at = text.find(content, cursor)
            if at < 0:
                return None
            begin = _header_end(text, cursor, at, turns) if turns.header else at
            cursor = at + len(content)
        else:  # a turn of tool calls only: its header says where it starts
            begin = _header_end(text, cursor, len(text), turns) if turns.header else -1
            if begin < 0:
                return None
            cursor = begin
        close = text.find(turns.end_of_turn, cursor)
        if close < 0:
            return None
        spans.append((begin, close + len(turns.end_of_turn)))
        cursor = close + len(turns.end_of_turn)
    return spans


def _header_end(text: str, start: int, content_at: int, turns: TurnFormat) -> int:
    """The end of this turn's header, searched between ``start`` and the content; the content's own start (or
    -1 without content) when no header of this turn is there."""
    header = text.rfind(turns.header, start, content_at) if content_at < len(text) else text.find(turns.header, start)
    if header < 0 or text.find(turns.end_of_turn, header, content_at if content_at < len(text) else header) >= 0:
        return content_at if content_at < len(text) else -1
    return header + len(turns.header)


def span_mask(spans: list[tuple[int, int]], offsets: list[tuple[int, int]]) -> list[int]:
    """1 for each token that overlaps a span (a token straddling its start, like ' A', is trained, as the
    {% generation %} machinery does)."""
    mask = [0] * len(offsets)
    for begin, end in spans:
        for i, (start, stop) in enumerate(offsets):
            if start < end and stop > begin:
                mask[i] = 1
    return mask
