"""Files that serving engines read, made loadable by them: what every export and every push writes.

Training templates carry ``{% generation %}...{% endgeneration %}`` markers (the assistant mask).
Only transformers' own jinja environment knows that tag: plain jinja2, and every engine built on it
(vLLM, llama.cpp's minja, Ollama's import, TGI), raises "unknown tag 'generation'". The serving
template replaces each marker with a block that renders nothing of its own (``{% if true %}`` /
``{% endif %}``), keeping its whitespace control, so it renders exactly the same text everywhere.
The run directory keeps the training template.

transformers 5 writes ``"tokenizer_class": "TokenizersBackend"``, a class that transformers 4 (which
serving engines pin) does not have; ``PreTrainedTokenizerFast`` loads the same tokenizer.json in both.
Its list of ``extra_special_tokens`` is a dict in transformers 4 (a list there fails to load): both
versions read the list as ``additional_special_tokens``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

GENERATION_TAG = re.compile(r"\{%(-?)\s*(end)?generation\s*(-?)%\}")
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
TRANSFORMERS_5_ONLY = {"TokenizersBackend"}


def serving_template(template: str) -> str:
    """The training template without its {% generation %} markers, rendering the same text."""

    def replace(match: re.Match) -> str:
        left, end, right = match.groups()
        return f"{{%{left} endif {right}%}}" if end else f"{{%{left} if true {right}%}}"

    return GENERATION_TAG.sub(replace, template)


def has_generation_tags(template: str) -> bool:
    return GENERATION_TAG.search(template) is not None


def make_serving_files(folder: Path) -> list[str]:
    """Rewrite a saved tokenizer's files in ``folder`` for serving; the names of the files changed."""
    changed = []
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        text = template_file.read_text(encoding="utf-8")
        if has_generation_tags(text):
            template_file.write_text(serving_template(text), encoding="utf-8")
            changed.append(template_file.name)
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        before = json.dumps(config, sort_keys=True)
        if config.get("tokenizer_class") in TRANSFORMERS_5_ONLY and (folder / "tokenizer.json").is_file():
            config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
        if isinstance(config.get("extra_special_tokens"), list):  # transformers 4 reads a dict there
            config["additional_special_tokens"] = config.pop("extra_special_tokens")
        if isinstance(config.get("chat_template"), str):
            config["chat_template"] = serving_template(config["chat_template"])
        if json.dumps(config, sort_keys=True) != before:
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            changed.append(config_file.name)
    return changed


def vllm_lora_notes(recipe) -> list[str]:
    """What vLLM's LoRA loader cannot serve in this adapter (empty: servable with --enable-lora)."""
    lora, notes = recipe.lora, []
    if lora.use_dora:
        notes.append("DoRA adapters are not supported by vLLM's LoRA loader")
    if lora.modules_to_save:
        notes.append(f"fully trained modules ({', '.join(lora.modules_to_save)}) are not loaded by vLLM's LoRA")
    if lora.r > 512:
        notes.append(f"rank {lora.r} is above vLLM's largest --max-lora-rank (512)")
    return notes
