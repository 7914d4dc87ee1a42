"""Build the quickstart's base model offline: a tiny Llama pretrained on the bundled legal primer.

The quickstart must run with no network, so its "base model" is made here, deterministically:
a byte-level BPE tokenizer with a ChatML template is trained on ``data/legal-qa/corpus.txt``,
then a small Llama-architecture model is pretrained on the same text for a minute on CPU. It
learns legal prose but has never seen a question-answer conversation, which is exactly what
the fine-tune then teaches it. Hidden and intermediate sizes are multiples of 64, as
bitsandbytes' 4-bit CPU kernels require.

Pretraining computes in fp32 on every CPU, so every machine builds the same base: fp32 is the
native dtype of CPUs without AVX512-BF16/AMX (bf16 there is ~30x slower), and where bf16 is native
it saves little at this size (0.132 vs 0.161 s per step with bf16 autocast on an AMX Xeon, 18%).
The weights are stored in bf16, as released models are.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qlora_pipe.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_CORPUS = Path("data/legal-qa/corpus.txt")
DEFAULT_OUT = Path("models/quickstart-base")
BUILD_INFO = "quickstart_build.json"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# ChatML, with {% generation %} markers around what the assistant says, including its
# end-of-turn token, so assistant-only loss trains the model to stop.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>' + '\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class BaseSpec:
    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 400
    learning_rate: float = 3e-3
    seed: int = 0


def build_tokenizer(corpus: str, vocab_size: int):
    """A byte-level BPE tokenizer (any text encodes) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator([corpus], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(spec: BaseSpec, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64 * math.ceil(vocab_size / 64),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def pretrain(model, blocks: torch.Tensor, spec: BaseSpec) -> list[float]:
    """Plain next-token pretraining with AdamW and a cosine schedule; returns the loss curve."""
    from qlora_pipe.terminal import progress_bar

    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    warmup = max(1, spec.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, spec.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    losses = []
    model.train()
    bar = progress_bar(range(spec.steps), desc="pretraining quickstart base", unit="step", mininterval=2)
    for _ in bar:
        idx = torch.randint(0, blocks.shape[0], (spec.batch_size,), generator=generator)
        batch = blocks[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)  # drawn at the bar's own pace
    return losses


def build_quickstart_base(
    out: Path = DEFAULT_OUT, corpus_path: Path = DEFAULT_CORPUS, spec: BaseSpec | None = None, force: bool = False
) -> Path:
    """Build (or reuse, when already built with the same spec) the quickstart base model."""
    spec = spec or BaseSpec()
    out = Path(out)
    info_path = out / BUILD_INFO
    if not force and info_path.is_file() and json.loads(info_path.read_text()).get("spec") == asdict(spec):
        log.info("quickstart base already built at %s", out)
        return out
    if not Path(corpus_path).is_file():
        raise UserError(f"corpus not found: {corpus_path} (run from the repository root)")
    started = time.time()
    torch.manual_seed(spec.seed)
    corpus = Path(corpus_path).read_text(encoding="utf-8")
    tokenizer = build_tokenizer(corpus, spec.vocab_size)
    paragraphs = [p.strip() for p in corpus.split("\n\n") if p.strip()]
    ids: list[int] = []
    for paragraph in paragraphs:
        ids.extend(tokenizer(paragraph)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|endoftext|>")])
    usable = len(ids) // spec.seq_len * spec.seq_len
    blocks = torch.tensor(ids[:usable]).view(-1, spec.seq_len)
    model = make_model(spec, len(tokenizer))
    losses = pretrain(model, blocks, spec)

    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {
        "spec": asdict(spec),
        "corpus": str(corpus_path),
        "corpus_tokens": len(ids),
        "parameters": sum(p.numel() for p in model.parameters()),
        "first_loss": losses[0],
        "final_loss": sum(losses[-10:]) / min(10, len(losses)),
        "seconds": round(time.time() - started, 1),
    }
    (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info(
        "quickstart base: %s params, loss %.2f -> %.2f in %.0fs, saved to %s",
        f"{info['parameters']:,}",
        info["first_loss"],
        info["final_loss"],
        info["seconds"],
        out,
    )
    return out
