"""Reaches into TRL. Verified with trl 1.16.0 (and 1.17.x allowed by pyproject).

orpo_trainer, orpo_config
    ORPO lives in ``trl.experimental.orpo`` in TRL 1.16 (an API TRL may change or remove without notice;
    importing it warns, silenced here). method: orpo imports it only through these two functions.
    Caught by: tests/test_preference_training.py::test_orpo_trains_on_pairs_without_a_reference.
    Its ``concatenated_forward`` builds the (rows x tokens x vocabulary) logits, where TRL's other trainers use
    the fused LM head of ``trl.trainer.utils.add_fused_lm_head`` (tiles; full logits never exist). The trainer
    returned here is ORPO with that head: the same chosen NLL (over prompt and response) and mean response
    log-probabilities from the head's per-token log-probabilities; ``logits/chosen`` and ``logits/rejected``
    become the mean logit over the attended positions (ORPO's counted the padding too).
    Caught by: tests/test_chunked_loss.py::test_orpo_chunked_forward_equals_trls.

keep_adapter_fp32_unless_bf16
    SFTTrainer.__init__ casts the trainable weights of every quantized model to bf16, whatever the
    precision. In an fp32 run on a CPU without native bf16 that makes every LoRA matmul an emulated
    bf16 one (about 30x slower); in an fp16 run the loss scaler needs fp32 master weights. So the
    adapter goes back to fp32 unless the run trains in bf16. The optimizer does not exist yet (it is
    created in train()), so nothing else holds the old tensors. Remove when TRL casts only for bf16.
    Caught by: tests/test_hardware.py::test_fp32_run_trains_like_bf16 (adapter dtypes on disk).

training_template, stop_token_trained, our_training_copy
    The assistant-only loss masks with TRL's {% generation %} machinery from ``trl.chat_template_utils``
    (not part of TRL's top-level API): whether a template has the markers, TRL's training variant of a
    known family's template, and TRL's check that the end-of-turn token falls inside the mask. Qwen3 and
    Llama 3.1 are recognized by TRL's stored copies of their templates (``qwen3_chat_template``,
    ``llama3_1_chat_template``) and masked with our own copies (data/template_files/*-training.jinja),
    which only add the markers: TRL's Qwen3 copy renders every turn's thinking, which Qwen3 itself
    leaves out of earlier turns, and TRL has no Llama 3.1 copy. TRL's family check renders the template
    (a tool-calling probe, among others) and lets a template's own bug (a TypeError) out of its helpers: such a
    template is no family TRL stores, so it takes the path of unknown templates, where its error is named.
    Caught by: tests/test_masking.py (masks checked token by token for each bundled family),
    tests/test_tool_masking.py (Qwen2.5, Qwen3 and Llama 3.1 as released, rendered like the originals) and
    tests/test_template_errors.py (a bug in a template's tool branch).

sequence_classifier_load
    A causal LM's checkpoint loaded as a sequence classifier (task: classification, method: reward) makes
    transformers print a load report naming lm_head.weight as unexpected and score.weight as missing: both
    are what such a load means. TRL's RewardTrainer silences exactly those two keys with
    ``trl.trainer.reward_trainer.suppress_seqcls_warning`` (not part of TRL's top-level API); the classifier
    loads go through it. Without it the report comes back (noise only).
    Caught by: tests/test_reward.py::test_a_reward_model_trains_exports_and_reloads_as_a_sequence_classifier.

loss_token_tile
    TRL's fused LM head projects ``trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE`` (4096) tokens at a time, a
    module global. Without Triton (a CPU) each tile's backward holds about six more tile-sized fp32 tensors, so
    the long-context benchmark (``python -m benchmarks plan-vs-cpu --document``) sets a smaller tile for its CPU
    steps and plans with the same one; training never changes it.
    Caught by: tests/test_long_context.py::test_loss_tile_is_set_and_restored.
"""

from __future__ import annotations

import contextlib

import torch

VERIFIED = {"trl": "1.16.0"}


def sequence_classifier_load():
    """A context in which loading a causal LM's checkpoint as a sequence classifier reports no expected keys."""
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    return suppress_seqcls_warning()


def keep_adapter_fp32_unless_bf16(model: torch.nn.Module, bf16: bool) -> None:
    if bf16:
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype == torch.bfloat16:
            param.data = param.data.float()


def training_template(tokenizer, template: str) -> str:
    """``template`` if it has {% generation %} markers, else TRL's training variant for a known family
    (ValueError for an unknown one)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(template):
        return template
    ours = our_training_copy(template)
    if ours is not None:
        from pathlib import Path

        return (Path(__file__).parents[1] / "data/template_files" / ours).read_text(encoding="utf-8")
    try:
        return get_training_chat_template(tokenizer) or template
    except Exception as exc:  # its probes render the template; one that fails there is no family TRL stores
        from jinja2.exceptions import TemplateError

        from qlora_pipe.compat.jinja import template_line

        if isinstance(exc, TemplateError) or template_line(exc) is not None:
            raise ValueError(f"the chat template fails on TRL's probe: {type(exc).__name__}: {exc}") from exc
        raise


def our_training_copy(template: str) -> str | None:
    """Our training copy (the released text with only {% generation %} markers added) of Qwen3's template
    (TRL's own copy renders every turn's thinking, which Qwen3 leaves out of earlier turns) and of
    Llama 3.1's (TRL keeps none). TRL's stored copies of the released texts recognize them."""
    from trl.chat_template_utils import llama3_1_chat_template, qwen3_chat_template

    return {qwen3_chat_template: "qwen3-training.jinja", llama3_1_chat_template: "llama-3.1-training.jinja"}.get(
        template
    )


def stop_token_trained(tokenizer, template: str) -> bool:
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    return is_chat_template_stop_token_trained(tokenizer, chat_template=template)


def orpo_trainer():
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo import ORPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    IGNORED = -100  # ORPO's label for a token that is not scored (TRL 1.16 hard-codes it)

    class ChunkedORPOTrainer(ORPOTrainer):
        """ORPO whose log-probabilities come from TRL's fused, tiled LM head (no full-vocabulary logits)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            model = self.model
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            add_fused_lm_head(base, outputs=("log_probs", "mean_logits"))

        def concatenated_forward(self, model, batch):
            if self.is_encoder_decoder or self.aux_loss_enabled:
                return super().concatenated_forward(model, batch)
            device = self.accelerator.device
            joined = self.concatenated_inputs(
                batch, is_encoder_decoder=False, padding_value=self.padding_value, device=device
            )
            rows = batch["chosen_labels"].shape[0]
            ids, attention = joined["concatenated_input_ids"], joined["concatenated_attention_mask"]
            attended = torch.where(attention == 1, ids, IGNORED)
            out = model(ids, attention_mask=attention, labels=attended, fused_lm_head=True, use_cache=False)
            scored = attended[:, 1:] != IGNORED  # the head's positions (label shifted by one)
            chosen_nll = -(out.log_probs[:rows] * scored[:rows]).sum() / scored[:rows].sum().clamp(min=1)
            response = joined["concatenated_labels"][:, 1:] != IGNORED
            logps = (out.log_probs * response).sum(-1) / response.sum(-1)
            means = out.mean_logits
            return logps[:rows], logps[rows:], means[:rows][scored[:rows]], means[rows:][scored[rows:]], chosen_nll

    return ChunkedORPOTrainer


def orpo_config():
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig


@contextlib.contextmanager
def loss_token_tile(tokens: int):
    """TRL's fused LM head with ``tokens`` per projection tile inside the block (the default after)."""
    from trl.kernels import chunked_logprob

    before = chunked_logprob.TOKEN_CHUNK_SIZE
    chunked_logprob.TOKEN_CHUNK_SIZE = tokens
    try:
        yield
    finally:
        chunked_logprob.TOKEN_CHUNK_SIZE = before
