"""Recipe sections for what happens after training: export, generation defaults, Hub publishing."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from qlora_pipe.recipe.base import Section, _a_size


class ExportSection(Section):
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype of the merged model (float32: the delta kept whole, twice the size)."
    )
    merge_base: Literal["dequantized", "original"] = Field(
        "dequantized", description="Merge into the NF4 weights trained against (default) or the 16-bit ones."
    )
    max_shard_size: str = Field("5GB", description="Largest safetensors shard of the merged model.")

    @field_validator("max_shard_size")
    @classmethod
    def _shard_is_a_size(cls, value: str) -> str:
        return _a_size(value)

    verify: bool = Field(True, description="Check the merged model against the trained model.")
    gguf: list[Literal["f16", "bf16", "q8_0", "q4_k_m", "q4_k_s", "q5_k_m", "q6_k"]] = Field(
        [], description="GGUF files to write after the merge, checked (skipped with a notice without the gguf extra)."
    )


class GenerationSection(Section):
    max_new_tokens: int = Field(256, ge=1, description="Longest answer of `qlora-pipe chat` and the merged model.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding (chat; merged generation_config).")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling threshold (with do_sample).")


class HubSection(Section):
    repo_id: str | None = Field(None, description="Hub repository (user/name) to publish to.")
    private: bool = Field(True, description="Create the Hub repository as private.")
    push_adapter_at_end: bool = Field(False, description="Push the adapter when training finishes.")
    push_checkpoints: bool = Field(False, description="Also push the adapter of every checkpoint as it is saved.")

    @model_validator(mode="after")
    def _repo_for_push(self) -> HubSection:
        if (self.push_adapter_at_end or self.push_checkpoints) and not self.repo_id:
            raise ValueError("pushing needs repo_id")
        return self
