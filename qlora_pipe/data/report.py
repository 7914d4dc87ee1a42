"""What the data stage did to each split: rows in and out by reason, lengths, trained-token share; for
GRPO's prompt rows (nothing trained: the model writes the answers) the prompts, their tokens and the
columns each reward reads."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qlora_pipe.errors import UserError

if TYPE_CHECKING:
    from qlora_pipe.recipe import DataSection

GIVEN_EVAL_DATA = "--data "


def given_eval_data(path: str) -> str:
    """The split name of the file given to `qlora-pipe eval --data`, read as the data stage's only split: it is
    eval data, not the training data its messages would otherwise name."""
    return f"{GIVEN_EVAL_DATA}{path}"


def percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    index = min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))
    return sorted_values[index]


@dataclass
class SplitReport:
    name: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    duplicate_rows: int = 0  # rows that repeat an earlier one (before source weights); dropped with data.dedupe
    total_tokens: int = 0
    supervised_tokens: int = 0
    length_percentiles: dict[str, int] = field(default_factory=dict)
    # tool calls, tool results and reasoning: how many, and trained or masked (data/chat_masks.py)
    conversation_parts: Counter = field(default_factory=Counter)
    masking: str = ""  # how the assistant turns were found (markers, or offsets), for conversations
    marks: list = field(default_factory=list, repr=False)  # preview marks of the first rows (not reported)
    # GRPO prompt rows: the row columns handed to every reward, and what each reward reads (label -> columns)
    prompt_rows: bool = False
    columns: list[str] = field(default_factory=list)
    reward_columns: dict[str, list[str]] = field(default_factory=dict)

    def add_counts(self, rows: list[dict[str, int]]) -> None:
        for counts in rows:
            if any(counts.get(k) for k in ("tool_calls_trained", "tool_calls_masked")):
                self.conversation_parts["rows_with_tool_calls"] += 1
            if counts.get("reasoning_turns"):
                self.conversation_parts["rows_with_reasoning"] += 1
            self.conversation_parts.update({k: v for k, v in counts.items() if v})

    def add_lengths(self, lengths: list[int], trained: list[int]) -> None:
        ordered = sorted(lengths)
        self.rows_kept = len(lengths)
        self.total_tokens = sum(lengths)
        self.supervised_tokens = sum(trained)
        self.length_percentiles = {f"p{q}": percentile(ordered, q) for q in (50, 90, 99)}
        self.length_percentiles["max"] = ordered[-1] if ordered else 0

    @property
    def supervised_share(self) -> float:
        return self.supervised_tokens / self.total_tokens if self.total_tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "split": self.name,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "dropped": dict(self.dropped),
            "truncated": self.truncated,
            "duplicate_rows": self.duplicate_rows,
            "total_tokens": self.total_tokens,
            "supervised_tokens": self.supervised_tokens,
            "supervised_share": round(self.supervised_share, 4),
            "length_percentiles": self.length_percentiles,
            "conversation_parts": dict(self.conversation_parts),
            "masking": self.masking,
            **(
                {"prompt_rows": True, "columns": self.columns, "reward_columns": self.reward_columns}
                if self.prompt_rows
                else {}
            ),
        }

    def what(self) -> str:
        """How a message names this split's rows: the training data, the eval data, or the file a command read."""
        if self.name.startswith(GIVEN_EVAL_DATA):
            return f"the eval data given with {self.name}"
        return {"train": "training data", "eval": "eval data"}.get(self.name, self.name)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SplitReport:
        return cls(
            name=raw["split"],
            rows_read=raw["rows_read"],
            rows_kept=raw["rows_kept"],
            dropped=Counter(raw["dropped"]),
            truncated=raw["truncated"],
            duplicate_rows=raw.get("duplicate_rows", 0),
            total_tokens=raw["total_tokens"],
            supervised_tokens=raw["supervised_tokens"],
            length_percentiles=raw["length_percentiles"],
            conversation_parts=Counter(raw.get("conversation_parts", {})),
            masking=raw.get("masking", ""),
            prompt_rows=raw.get("prompt_rows", False),
            columns=raw.get("columns", []),
            reward_columns=raw.get("reward_columns", {}),
        )

    def line(self) -> str:
        dropped = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "none"
        lengths = " ".join(f"{k}={v}" for k, v in self.length_percentiles.items())
        truncated = f", {self.truncated} truncated" if self.truncated else ""
        duplicates = f", {self.duplicate_rows} duplicate rows" if self.duplicate_rows else ""
        if self.prompt_rows:
            return self.prompt_line(dropped, lengths, duplicates)
        return (
            f"{self.name}: {self.rows_kept}/{self.rows_read} rows kept (dropped: {dropped}{truncated}{duplicates}); "
            f"{self.total_tokens:,} tokens, {self.supervised_tokens:,} trained ({self.supervised_share:.0%}); "
            f"length {lengths}{parts_line(self.conversation_parts)}"
            f"{'; loss mask: ' + self.masking if self.masking else ''}"
        )

    def prompt_line(self, dropped: str, lengths: str, duplicates: str) -> str:
        """GRPO: nothing in a prompt row is trained (the model writes the answers, the rewards score them)."""
        tools = self.conversation_parts.get("prompts_with_tools", 0)
        reads = ", ".join(f"{label} ({', '.join(c) or 'the answer alone'})" for label, c in self.reward_columns.items())
        return (
            f"{self.name}: {self.rows_kept}/{self.rows_read} prompts kept (dropped: {dropped}{duplicates}); "
            f"{self.total_tokens:,} prompt tokens (none trained: the model writes the answers); prompt length "
            f"{lengths}{f'; {tools} with tools' if tools else ''}; columns to the rewards: "
            f"{', '.join(self.columns) or 'none'}{f'; rewards read: {reads}' if reads else ''}"
        )


# (count key, words) of the report's tool and reasoning clauses, in order
TOOL_PARTS = (
    ("rows_with_tool_calls", "rows with tool calls"),
    ("tool_calls_trained", "tool calls trained"),
    ("tool_calls_masked", "tool calls masked"),
    ("tool_results_masked", "tool results masked"),
    ("tool_results_trained", "tool results trained"),
)
REASONING_PARTS = (
    ("rows_with_reasoning", "rows with reasoning"),
    ("reasoning_trained", "reasoning turns trained"),
    ("reasoning_masked", "reasoning turns masked"),
    ("reasoning_dropped", "reasoning turns dropped"),
    ("reasoning_not_rendered", "earlier turns' reasoning left out by the template"),
    ("empty_think_masked", "empty <think></think> blocks masked"),
)

IMAGE_PARTS = (("images", "images"), ("image_tokens", "image tokens, never trained"))


def parts_line(parts: Counter) -> str:
    """'; tools: ..., reasoning: ..., images: ...' for a split with tool calls, reasoning or images, else ''."""
    out = ""
    for title, known in (("tools", TOOL_PARTS), ("reasoning", REASONING_PARTS), ("images", IMAGE_PARTS)):
        found = [f"{parts[key]} {words}" for key, words in known if parts.get(key)]
        out += f"; {title}: {', '.join(found)}" if found else ""
    return out


def require_eval_rows(data: DataSection, kept: int, report: SplitReport, rows: str = "rows") -> None:
    """A configured eval split (data.eval_path, eval_sources or eval_fraction) left with no row is an error
    that says why its rows were dropped; it would otherwise be left out without a word (no eval loss, no
    held-out scores)."""
    if kept or not data.has_eval():
        return
    if data.eval_fraction > 0:
        split = f"eval data (data.eval_fraction {data.eval_fraction:g} of the training rows)"
    else:
        split = f"eval data {data.eval_path}" if data.eval_path else "eval data (data.eval_sources)"
    dropped = ", ".join(f"{n} {why}" for why, n in sorted(report.dropped.items())) or "none"
    raise UserError(f"{split}: no usable rows: {report.rows_kept}/{report.rows_read} {rows} kept (dropped: {dropped})")
