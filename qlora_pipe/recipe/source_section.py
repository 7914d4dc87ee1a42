"""One data source of a recipe (data.sources, data.eval_sources): a local file or a Hub dataset."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from qlora_pipe.recipe.base import Section


class SourceSection(Section):
    path: str | None = Field(None, description="Local file, directory or glob (.jsonl, .json, .csv, .parquet).")
    hub: str | None = Field(None, description="Hugging Face Hub dataset id (or a local dataset folder).")
    config: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Hub dataset split.")
    revision: str | None = Field(None, description="Hub dataset revision (branch, tag or commit).")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"] = Field(
        "auto", description="Row format; 'auto' detects it from the columns and says what it found."
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename columns to the format's names, e.g. {instruction: question}."
    )
    weight: float = Field(1.0, gt=0, description="Rows drawn relative to the source size (0.5: half, 2: twice).")
    samples: int | None = Field(None, ge=1, description="Exact number of rows to draw (instead of weight).")

    @model_validator(mode="after")
    def _one_location(self) -> SourceSection:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' or 'hub'")
        if self.samples is not None and self.weight != 1.0:
            raise ValueError("give 'weight' or 'samples', not both")
        return self

    def label(self) -> str:
        return self.path or f"hub:{self.hub}" + (f"/{self.config}" if self.config else "") + f"[{self.split}]"
