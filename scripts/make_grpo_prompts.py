"""Write the bundled GRPO prompts (data/legal-qa/grpo_*.jsonl): name the area of law a question is about.

Each QA row's question (train.jsonl for training, eval.jsonl held out) becomes a prompt that asks for the
area of law in a fixed format, "Area: <area>", with the areas listed; its ``answer`` column is the area
the topic data gives the row (data/legal-qa/topics_train.jsonl, written by make_topic_labels.py, labels
each QA row by the primer paragraph its reference answer comes from). Rows with no single area are left
out. The rewards of recipes/quickstart-grpo.yaml check the format (regex) and the area (exact match of
the format's group against ``answer``). Deterministic.

    python scripts/make_grpo_prompts.py
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data/legal-qa"
WARMUP_PER_AREA = 4  # the SFT warm-up that teaches the format: 4 answered training prompts of each area
INSTRUCTION = "Which area of law is this question about? Answer with 'Area: ' and one of: {areas}."


def main() -> None:
    topics = [json.loads(line) for line in (DATA / "topics_train.jsonl").read_text().splitlines() if line.strip()]
    area_of = {row["text"]: row["label"] for row in topics}
    areas = sorted(set(area_of.values()))
    for split in ("train", "eval"):
        out = []
        for line in (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            messages = json.loads(line)["messages"]
            question, answer = messages[-2]["content"], messages[-1]["content"]
            area = area_of.get(f"{question} {answer}")
            if area is None:
                continue
            prompt = f"{INSTRUCTION.format(areas=', '.join(areas))}\n\nQuestion: {question}"
            out.append({"prompt": prompt, "answer": area})
        write(DATA / f"grpo_{split}.jsonl", out)
        if split == "train":  # the warm-up: a few answers in the format, for SFT before GRPO
            write(DATA / "grpo_warmup.jsonl", warmup(out, areas))


def warmup(rows: list[dict], areas: list[str]) -> list[dict]:
    """As many answered prompts of each area: a warm-up that leans to one area teaches GRPO to say it always."""
    chosen = [r for area in areas for r in [r for r in rows if r["answer"] == area][:WARMUP_PER_AREA]]
    return [{"prompt": r["prompt"], "completion": f"Area: {r['answer']}"} for r in chosen]


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
