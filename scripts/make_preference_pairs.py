"""Write the bundled preference pairs (data/legal-qa/preference_*.jsonl) from the SFT rows.

Each question's reference answer is the chosen answer. The rejected one is the same answer with the
concept it defines swapped for the concept of another question's answer (7 rows further on, wrapping
around): "Negligence is a clear proposal by one party to enter into a contract..." for "What is an
offer?". Fluent, in the trained style, and wrong for this question; the two answers differ only in
the concept named, so the preference to learn is to name the concept the question asks about.
Answers that do not start "X is/are/means/refers to" are left out. Deterministic.

    python scripts/make_preference_pairs.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data/legal-qa"
OFFSET = 7


SUBJECT = re.compile(r"^(.{2,60}?) (is|are|means|refers to) ")


def subject(answer: str) -> str | None:
    found = SUBJECT.match(answer)
    return found.group(1) if found else None


def pairs(rows: list[dict]) -> list[dict]:
    usable = [row for row in rows if subject(row["messages"][-1]["content"])]
    out = []
    for i, row in enumerate(usable):
        messages, answer = row["messages"], row["messages"][-1]["content"]
        own = subject(answer)
        other = next(
            s
            for k in range(OFFSET, OFFSET + len(usable))
            if (s := subject(usable[(i + k) % len(usable)]["messages"][-1]["content"])).lower() != own.lower()
        )
        wrong = other[0].upper() + other[1:] + answer[len(own) :]
        out.append({"prompt": messages[:-1], "chosen": answer, "rejected": wrong})
    return out


def main() -> None:
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        lines = [json.dumps(pair, ensure_ascii=False) for pair in pairs(rows)]
        (DATA / f"preference_{split}.jsonl").write_text("\n".join(lines) + "\n")
        print(f"{split}: {len(lines)} pairs")


if __name__ == "__main__":
    main()
