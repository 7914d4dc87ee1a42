"""`qlora-pipe eval`'s answer scores over a set of answers (rewards/answer_match.py scores one), and its table."""

from __future__ import annotations

from qlora_pipe.rewards.answer_match import exact_match, rouge_l, token_f1


def score_answers(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean exact match, token F1 and ROUGE-L over answer pairs (0 when there are none)."""
    pairs = list(zip(predictions, references, strict=True))
    n = max(len(pairs), 1)
    return {
        "exact_match": sum(exact_match(p, r) for p, r in pairs) / n,
        "token_f1": sum(token_f1(p, r) for p, r in pairs) / n,
        "rouge_l": sum(rouge_l(p, r) for p, r in pairs) / n,
    }


# (label, key, format) of the eval table rows; loss and perplexity are lower-is-better.
TABLE_ROWS = (
    ("loss on reference answers", "loss", "{:.4f}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("exact match", "exact_match", "{:.1%}"),
    ("token F1", "token_f1", "{:.1%}"),
    ("ROUGE-L", "rouge_l", "{:.1%}"),
    ("answers ending at end of turn", "stopped_at_end_of_turn", "{:.1%}"),
    ("tool calls: function names right", "tool_name_accuracy", "{:.1%}"),
    ("tool calls: arguments exact", "tool_arguments_exact", "{:.1%}"),
    ("mean answer length (tokens)", "mean_answer_tokens", "{:.1f}"),
)


def eval_table(result: dict, markdown: bool = False) -> str:
    """Base and tuned columns of an eval result, for the terminal or a markdown model card."""
    base, tuned = result["base"], result["tuned"]
    rows = [
        (label, fmt.format(base[key]), fmt.format(tuned[key]))
        for label, key, fmt in TABLE_ROWS
        if key in base and key in tuned  # the tool-call rows: only where references call tools
    ]
    if markdown:
        lines = ["| metric | base | tuned |", "|---|---|---|"]
        return "\n".join(lines + [f"| {label} | {b} | {t} |" for label, b, t in rows])
    width = max(len(label) for label, _, _ in rows)
    lines = [f"{'':{width}}  {'base':>10}  {'tuned':>10}"]
    return "\n".join(lines + [f"{label:{width}}  {b:>10}  {t:>10}" for label, b, t in rows])


def eval_heading(result: dict) -> str:
    tools = f"{result['base']['tool_rows']} of them call tools; " if "tool_rows" in result["base"] else ""
    return (
        f"{result['examples']} examples from {result['data']} ({result['base']['answer_tokens']} answer tokens); "
        f"{tools}"
        f"{result['generated']} greedy answers of at most {result['max_new_tokens']} tokens; "
        f"base: the 4-bit base without the adapter; tuned: {result['tuned_model']}"
    )
