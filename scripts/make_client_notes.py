"""Write the bundled client-note data (data/legal-qa/client_notes_*.jsonl) from the SFT rows.

A content-generation task in a fixed house style, for the GPT-2 recipe (recipes/gpt2-c_attn.yaml):
the prompt gives a reference answer and asks for it as a short note to a client; the completion
greets the client, names the concept asked about, gives the answer and closes with the house's
disclaimer. Prompt / completion rows (the data stage's prompt_completion format). Deterministic.

    python scripts/make_client_notes.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data/legal-qa"
SUBJECT = re.compile(r"^(.{2,60}?) (is|are|means|refers to) ")


def note(row: dict) -> dict:
    answer = row["messages"][-1]["content"]
    found = SUBJECT.match(answer)
    topic = found.group(1) if found else "your question"
    topic = topic if topic[:2].isupper() else topic[0].lower() + topic[1:]
    return {
        "prompt": f"Rewrite this answer as a short note to a client:\n{answer}",
        "completion": (
            f"Dear client,\n\nYou asked about {topic}. {answer}\n\n"
            "This is general information, not legal advice.\nKind regards"
        ),
    }


def main() -> None:
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        lines = [json.dumps(note(row), ensure_ascii=False) for row in rows]
        out = DATA / f"client_notes_{split}.jsonl"
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"{out}: {len(lines)} rows")


if __name__ == "__main__":
    main()
