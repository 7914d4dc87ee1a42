"""The tokenizer's special tokens as training needs them: a pad token distinct from EOS. Shared by the model
and data stages (light: no torch)."""

from __future__ import annotations

import logging

from qlora_pipe.errors import UserError

log = logging.getLogger(__name__)

# Tokens that tokenizers of common model families reserve for padding, in order of preference.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>", "<unk>")


def ensure_distinct_pad(tokenizer) -> None:
    """Pick a pad token that is not EOS: with pad == EOS the collator masks EOS and the model never stops."""
    if tokenizer.eos_token is None:
        raise UserError("the tokenizer defines no EOS token; cannot train the model to stop")
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    for candidate in PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            log.info("pad token: using %r (distinct from EOS %r)", candidate, tokenizer.eos_token)
            return
    # A byte-level BPE (GPT-2 and its kin) has a token for the NUL byte, which text never contains. Padding is
    # masked by position (attention mask, labels -100), so any token distinct from EOS pads correctly.
    nul = tokenizer("\x00", add_special_tokens=False)["input_ids"]
    if len(nul) == 1 and nul[0] != tokenizer.eos_token_id and tokenizer.decode(nul) == "\x00":
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(nul[0])
        log.info("pad token: the tokenizer has none besides EOS; using the NUL byte's token (id %d)", nul[0])
        return
    raise UserError(
        f"the tokenizer has no pad token distinct from EOS {tokenizer.eos_token!r} and none of "
        f"{', '.join(PAD_CANDIDATES)}; add one to the tokenizer"
    )
