"""Reaches into TRL's GRPOTrainer. Verified with trl 1.16.0 (and 1.17.x allowed by pyproject).

RowToolsPrompts
    GRPOTrainer renders every prompt with one list of tools: the callables passed to it (``tools=``), which
    it also runs when the model calls them. A prompt row's ``tools`` column (function schemas, as SFT tool
    rows list them; nothing to run) is rendered into that row's prompt instead, the way TRL renders each
    environment's tools: ``_generate_and_score_completions`` (which gets the rows) records each row's
    functions for the batch, and ``_tokenize_prompts`` (which gets only the prompts, in the same order)
    renders each prompt with its own. A batch without tools goes through TRL's own rendering unchanged.
    Nothing is executed: the ``tool_call`` reward scores the calls the model writes.
    Caught by: tests/test_grpo_tools.py::test_grpo_renders_each_prompts_tools_in_training (the prompt
    ids TRL generated from, compared with the row rendered with its tools).
"""

from __future__ import annotations

import json
from typing import Any

VERIFIED = {"trl": "1.16.0"}


def _functions(tools: Any) -> list[dict[str, Any]] | None:
    return (json.loads(tools) if isinstance(tools, str) else tools) or None


class RowToolsPrompts:
    """Mixed in before GRPOTrainer: each prompt rendered with its row's tools."""

    _row_tools: list | None = None

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self._row_tools = [_functions(row.get("tools")) for row in inputs]
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._row_tools = None

    def _tokenize_prompts(self, prompts: list):
        tools = self._row_tools
        if not tools or not any(tools) or len(tools) != len(prompts) or getattr(self, "_is_vlm", False):
            return super()._tokenize_prompts(prompts)
        ids = []
        for prompt, functions in zip(prompts, tools, strict=True):
            rendered = self.processing_class.apply_chat_template(
                conversation=prompt,
                tools=functions,
                chat_template=self.chat_template,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                **self.chat_template_kwargs,
            )
            ids.append(list(rendered["input_ids"]))
        return ids, None, {}
