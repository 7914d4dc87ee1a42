"""The shapes the memory planner needs, read from a model's config.json alone.

The model is instantiated on PyTorch's meta device: every parameter gets its real shape and
dtype but no storage, so a 14B model is enumerated in about a second without its weights. This
works for every architecture transformers knows, with no per-family tables to drift.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_pipe.errors import UserError
from qlora_pipe.recipe.model_source import local_path

BUNDLED = Path(__file__).parent / "model_configs"


@dataclass(frozen=True)
class Linear:
    name: str  # qualified module name, e.g. model.layers.0.self_attn.q_proj
    in_features: int
    out_features: int
    bias: bool


@dataclass
class ModelShape:
    """Everything the planner knows about a model: dimensions, and which weights get quantized."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int | None
    linears: list[Linear] = field(default_factory=list)  # the layers bitsandbytes quantizes (all but lm_head)
    other_params: int = 0  # embeddings, lm_head, norms, biases: kept in 16-bit
    lm_head_params: int = 0
    tied_embeddings: bool = False
    # An untied plain lookup embedding, and the 16-bit width the checkpoint stores it in (0: fp32 or unknown):
    # an fp32-compute load keeps it at that width (models/embedding_storage.py).
    stored_embedding: str = ""
    stored_embedding_params: int = 0
    stored_embedding_bytes: int = 0

    @property
    def quantized_params(self) -> int:
        return sum(lin.in_features * lin.out_features for lin in self.linears)

    @property
    def total_params(self) -> int:
        return self.quantized_params + self.other_params

    def embedding_bytes_saved(self, compute_bytes: int, trained_in_full: list[str]) -> int:
        """Bytes an fp32-compute load saves by keeping the input embedding at its stored width."""
        name = self.stored_embedding
        if not name or compute_bytes <= self.stored_embedding_bytes:
            return 0
        if any(name == kept or name.endswith("." + kept) for kept in trained_in_full):
            return 0
        return self.stored_embedding_params * (compute_bytes - self.stored_embedding_bytes)


def bundled_config_path(name: str) -> Path | None:
    """The config shipped with qlora-pipe for a well-known Hub id (works offline)."""
    path = BUNDLED / (name.replace("/", "__") + ".json")
    return path if path.is_file() else None


def read_config(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """config.json of a local model directory, a GGUF file (read from its metadata, no conversion), a bundled
    well-known model, or the Hub (config only)."""
    from qlora_pipe.models.gguf_source import gguf_config, gguf_file_of

    gguf = gguf_file_of(name_or_path)
    if gguf is not None:
        return gguf_config(gguf)
    local = local_path(name_or_path) or Path(name_or_path)
    if local.is_dir():
        path = local / "config.json"
        if not path.is_file():
            raise UserError(f"model.name_or_path: {local} has no config.json")
    elif local.suffix == ".json" and local.is_file():
        path = local
    elif (bundled := bundled_config_path(name_or_path)) is not None:
        path = bundled
    else:
        path = _download_config(name_or_path, revision)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"model.name_or_path: cannot read {path}: {exc}") from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"model.name_or_path: {path} is not a transformers config (no model_type)")
    return config


def _download_config(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision))
    except Exception as exc:  # offline, gated, missing: all end the same way for the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"model.name_or_path: cannot get config.json for {repo_id!r} ({reason}); "
            "give a local model directory or a config.json path"
        ) from exc


def shape_from_config(config: dict[str, Any]) -> ModelShape:
    """Instantiate the architecture on the meta device and list its parameters."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        cfg = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"model config: cannot build model_type {config.get('model_type')!r}: {exc}") from exc
    text = cfg.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    output = model.get_output_embeddings()
    linears, quantized_ids = [], set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not output:
            linears.append(Linear(name, module.in_features, module.out_features, module.bias is not None))
            quantized_ids.add(id(module.weight))
    seen, other = set(), 0
    for param in model.parameters():  # parameters() yields a tied weight once
        if id(param) not in quantized_ids and id(param) not in seen:
            seen.add(id(param))
            other += param.numel()
    embedding = model.get_input_embeddings()
    tied = output is not None and output.weight is embedding.weight
    stored = {"bfloat16": 2, "float16": 2}.get(str(config.get("dtype") or config.get("torch_dtype")), 0)
    lookup = type(embedding) is nn.Embedding and not tied and stored
    return ModelShape(
        model_type=cfg.model_type,
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        max_positions=getattr(text, "max_position_embeddings", None),
        linears=linears,
        other_params=other,
        lm_head_params=0 if tied or output is None else output.weight.numel(),
        tied_embeddings=tied,
        stored_embedding=next((n for n, m in model.named_modules() if m is embedding), "") if lookup else "",
        stored_embedding_params=embedding.weight.numel() if lookup else 0,
        stored_embedding_bytes=stored if lookup else 0,
    )
