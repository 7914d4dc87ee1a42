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

fused_lm_head
    GRPOTrainer scores completions through TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``
    patches the model's forward: ``fused_lm_head=True`` returns per-token log-probs computed in tiles that
    are 32768 vocabulary entries wide, never the full logits). micro_batch_size auto probes the training
    step before the trainer exists, so it patches the model the same way for the probe and restores the
    forward afterwards (the trainer patches it again when it is built).
    Caught by: tests/test_grpo.py::test_grpo_step_peak_and_kv_cache_match_the_plan (the probe's profiled
    peak within 5% of a real GRPO step's) and the auto run beside it (a real run through the probe).

quiet_unscorable_rows_notice
    A completion every reward returned None for (not applicable) makes GRPOTrainer warn with the row's
    every column, prompt and completion, at each such step. The run shows n/a for that reward instead
    (training/progress.py); the warning is dropped unless the run logs at DEBUG (--debug).
    Caught by: tests/test_grpo_rewards.py::test_a_reward_that_applies_to_no_row_shows_n_a_and_training_goes_on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

VERIFIED = {"trl": "1.16.0"}
GRPO_LOGGER = "trl.trainer.grpo_trainer"
UNSCORABLE_NOTICE = "All reward functions returned None for the following kwargs"


class RowToolsPrompts:
    """Mixed in before GRPOTrainer: each prompt rendered with its row's tools."""

    _row_tools: list | None = None
    tools_of_row: Any = None  # the row's functions or None (data/prompts.py's row_tools, set by the trainer class)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self._row_tools = [self.tools_of_row(row) for row in inputs]
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


@contextmanager
def fused_lm_head(model, temperature: float) -> Iterator[None]:
    """The model's forward takes ``fused_lm_head=True`` as in GRPOTrainer, for as long as this lasts."""
    from trl.trainer.utils import add_fused_lm_head

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.__dict__.get("forward")  # an instance forward: already patched
    add_fused_lm_head(base, temperature=temperature, outputs=("log_probs", "entropy"))
    try:
        yield
    finally:
        if before is None:
            del base.forward
        else:
            base.forward = before


class _DropUnscorableNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return UNSCORABLE_NOTICE not in str(record.msg)


def quiet_unscorable_rows_notice() -> None:
    """Drop GRPOTrainer's warning for a row no reward applied to (see above), unless logging at DEBUG."""
    logger = logging.getLogger(GRPO_LOGGER)
    quiet = logging.getLogger().getEffectiveLevel() > logging.DEBUG
    if quiet and not any(isinstance(f, _DropUnscorableNotice) for f in logger.filters):
        logger.addFilter(_DropUnscorableNotice())
