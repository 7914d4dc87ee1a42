"""Write the bundled topic-classification data (data/legal-qa/topics_*.jsonl): the area of law of a text.

data/legal-qa/corpus.txt opens every area with an introductory paragraph ("Contract law is about ...")
and the reference answers of the QA rows are sentences of the paragraphs that follow it, so each
answer's area is known. Training rows: each QA row's question and reference answer as one text
(train.jsonl and eval.jsonl), labelled with that area. Held-out rows: the other sentences of those
paragraphs, which no training text contains. Rows whose answer is in no single area are left out.
Text / label rows. Deterministic.

    python scripts/make_topic_labels.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data/legal-qa"
# The first words of each area's introductory paragraph in corpus.txt, and the label it gives.
AREAS = {
    "Contract law is about": "contracts",
    "Tort law is about": "torts",
    "Property law is about": "property",
    "Criminal law is about": "criminal",
    "Civil procedure is the set": "civil procedure",
    "The law of evidence decides": "evidence",
    "Constitutional law is about": "constitutional",
    "Business law covers": "business",
    "The law of wills and trusts": "wills and trusts",
    "Employment law is about": "employment",
    "Intellectual property law protects": "intellectual property",
    "The law of remedies is about": "remedies",
}


def area_paragraphs(answers: list[str]) -> dict[str, list[str]]:
    """Each area's paragraphs, up to the next area's introduction; the last area ends at the first paragraph
    that holds no reference answer (the primer's closing comparisons)."""
    paragraphs = [p for p in (DATA / "corpus.txt").read_text(encoding="utf-8").split("\n\n") if p.strip()]
    starts = [(i, label) for i, p in enumerate(paragraphs) for intro, label in AREAS.items() if p.startswith(intro)]
    last = starts[-1][0]
    closing = next(i for i in range(last + 1, len(paragraphs)) if not any(a[:80] in paragraphs[i] for a in answers))
    ends = [start for start, _ in starts[1:]] + [closing]
    return {label: paragraphs[start + 1 : end] for (start, label), end in zip(starts, ends, strict=True)}


def main() -> None:
    rows = [
        json.loads(line)
        for split in ("train", "eval")
        for line in (DATA / f"{split}.jsonl").read_text().splitlines()
        if line.strip()
    ]
    answers = sorted({row["messages"][-1]["content"] for row in rows})
    areas = area_paragraphs(answers)
    train = []
    for row in rows:
        question, answer = row["messages"][-2]["content"], row["messages"][-1]["content"]
        labels = [label for label, paras in areas.items() if any(answer[:80] in p for p in paras)]
        if len(labels) == 1:
            train.append({"text": f"{question} {answer}", "label": labels[0]})
    held_out = [
        {"text": sentence, "label": label}
        for label, paras in areas.items()
        for paragraph in paras
        for sentence in re.split(r"(?<=[.!?])\s+", paragraph.strip())
        if not any(sentence in a or a in sentence for a in answers)
    ]
    for split, out in (("train", train), ("eval", held_out)):
        path = DATA / f"topics_{split}.jsonl"
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in out) + "\n", encoding="utf-8")
        print(f"{path}: {len(out)} rows")


if __name__ == "__main__":
    main()
