"""What every recipe section shares: unknown keys are errors; sizes read by one grammar."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from qlora_pipe.errors import UserError
from qlora_pipe.sizes import parse_size


def _a_size(value: str | None) -> str | None:
    """Sizes are read by the one grammar of qlora_pipe.sizes (24GiB, 5GB, 500MB, bytes)."""
    if value is not None:
        try:
            parse_size(value)
        except UserError:
            raise ValueError("not a size (e.g. 24GiB, 5GB, 500MB)") from None
    return value


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, not silently ignored, and no float may be
    infinite or NaN (YAML reads .inf, .nan and 1e400 as floats, and bounds like gt=0 let inf through)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
