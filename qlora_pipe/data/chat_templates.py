"""Chat templates: the tokenizer's own, a small built-in set, or a Jinja file from the recipe.

A base model without a template and no choice in the recipe is an error, never a silent
fallback: the template decides what text the model is trained on and must match serving.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qlora_pipe.data.template_errors import check_compiles
from qlora_pipe.errors import UserError

TEMPLATE_DIR = Path(__file__).parent / "template_files"


@dataclass(frozen=True)
class BuiltinTemplate:
    file: str
    end_of_turn: str | None  # becomes the tokenizer's EOS so generation stops there; None keeps EOS
    required_tokens: tuple[str, ...]


BUILTIN_TEMPLATES = {
    "chatml": BuiltinTemplate("chatml.jinja", "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "llama-3": BuiltinTemplate(
        "llama-3.jinja", "<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    ),
    "mistral": BuiltinTemplate("mistral.jinja", None, ()),
    # Gemma base models (Gemma 2, Gemma 3): the turn tokens are in the vocabulary, no template ships.
    "gemma": BuiltinTemplate("gemma.jinja", "<end_of_turn>", ("<start_of_turn>", "<end_of_turn>")),
    # Instruction / response text ending in the tokenizer's own EOS: for base models with no chat tokens.
    "plain": BuiltinTemplate("plain.jinja", None, ()),
}


def select_chat_template(tokenizer, choice: str | None) -> str:
    """Install the recipe's template choice on the tokenizer; returns a description of what is used."""
    if choice is None:
        return "the tokenizer's own" if tokenizer.chat_template else "none"
    if choice in BUILTIN_TEMPLATES:
        spec = BUILTIN_TEMPLATES[choice]
        vocab = tokenizer.get_vocab()
        missing = [t for t in spec.required_tokens if t not in vocab]
        if missing:
            raise UserError(
                f"data.chat_template: {choice} needs the tokens {', '.join(missing)}, which this tokenizer "
                "does not have as single tokens; choose another template or a .jinja file"
            )
        tokenizer.chat_template = (TEMPLATE_DIR / spec.file).read_text(encoding="utf-8")
        if spec.end_of_turn:
            tokenizer.eos_token = spec.end_of_turn
        return f"built-in {choice}"
    path = Path(choice).expanduser()
    if path.suffix != ".jinja" and not path.exists():
        raise UserError(
            f"data.chat_template: {choice!r} is neither a built-in template "
            f"({', '.join(BUILTIN_TEMPLATES)}) nor a .jinja file"
        )
    if not path.is_file():
        raise UserError(f"data.chat_template: file not found: {path}")
    tokenizer.chat_template = path.read_text(encoding="utf-8")
    check_compiles(tokenizer, None, f"data.chat_template: {path}")
    return f"file {path}"


def require_chat_template(tokenizer, model_name: str) -> None:
    """A template is there and compiles (a syntax error is refused here, before any row is rendered)."""
    if not tokenizer.chat_template:
        raise UserError(
            f"the tokenizer of {model_name!r} has no chat template; set data.chat_template to one of "
            f"{', '.join(BUILTIN_TEMPLATES)} or to a .jinja file"
        )
    check_compiles(tokenizer, None, f"the chat template of {model_name!r}")
