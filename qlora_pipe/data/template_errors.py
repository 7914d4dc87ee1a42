"""A chat template that fails, named by its own error and the template line it failed at, on one line.

A syntax error (an unclosed tag, an unknown filter) fails every render: it is refused when the template is
installed or required, before any row is read. A runtime error (string + number, an undefined name called)
may happen on some rows only: those rows are dropped and counted under the template's error in the data
report, as rows the template refuses on purpose (``raise_exception``) are; when no row is left, the data
stage's one-line error carries that reason. Any other error is not the template's and is raised as it is.
"""

from __future__ import annotations

from jinja2.exceptions import TemplateError, TemplateSyntaxError

from qlora_pipe.compat.jinja import template_line
from qlora_pipe.errors import UserError

# What TRL's end-of-turn check renders (an answered turn followed by a user turn), and a plain conversation.
PLAIN = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]
SYSTEM = {"role": "system", "content": "s"}


def _one_line(text: str) -> str:
    return " ".join(text.split())


def is_refusal(exc: BaseException) -> bool:
    """The template's own ``raise_exception`` (transformers raises jinja2's base TemplateError with its text)."""
    return type(exc) is TemplateError


def template_failure(exc: BaseException) -> str | None:
    """'line 3: unexpected end of template', 'TypeError at line 3: can only concatenate ...', or the text of a
    deliberate refusal; None when ``exc`` was not raised by a chat template."""
    if isinstance(exc, TemplateSyntaxError):
        return f"line {exc.lineno}: {_one_line(exc.message or str(exc))}"
    if is_refusal(exc):
        return _one_line(str(exc))
    line = template_line(exc)
    if line is None:
        return None
    return f"{type(exc).__name__} at line {line}: {_one_line(str(exc))}"


def row_drop_reason(exc: BaseException) -> str | None:
    """The data report's reason for a row its template cannot render; None when the error is not the template's."""
    failure = template_failure(exc)
    if failure is None:
        return None
    if is_refusal(exc):
        return f"the chat template refuses the row: {failure[:120]}"
    return f"the chat template fails on the row: {failure[:160]}"


def check_compiles(tokenizer, template: str | None, what: str) -> None:
    """Refuse a template with a syntax error in one line naming ``what`` it is and the line: rendering compiles it
    first. Runtime errors are not judged here (a template may refuse this conversation and render the rows)."""
    try:
        tokenizer.apply_chat_template(PLAIN[:1], tokenize=False, chat_template=template)
    except TemplateSyntaxError as exc:
        raise UserError(f"{what} does not compile: {template_failure(exc)}") from exc
    except Exception:  # runtime errors are judged on the rows: dropped and counted with the error
        pass


def plain_conversation_failure(tokenizer, template: str | None) -> str | None:
    """Why the template cannot render a plain user/assistant/user conversation, with or without a system message
    (its own error and line), or None when it renders one. A check that renders such a probe and swallows errors
    would otherwise blame the template for something else (its end-of-turn token, its turn layout)."""
    first = None
    for messages in (PLAIN, [SYSTEM, *PLAIN]):  # some templates insist on a system message
        try:
            tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
            return None
        except Exception as exc:
            if template_failure(exc) is None:
                raise
            first = first or exc
    verb = "refuses" if is_refusal(first) else "fails on"
    return f"the chat template {verb} a plain user/assistant conversation: {template_failure(first)}"


def refuse_failing_template(tokenizer, template: str | None) -> None:
    """One line with the template's own error when it cannot render a plain conversation: every check that
    renders one (the turn probes, TRL's helpers) would fail for that reason, or swallow it and blame another."""
    failure = plain_conversation_failure(tokenizer, template)
    if failure is not None:
        raise UserError(f"{failure} (fix the template or choose data.chat_template)")
