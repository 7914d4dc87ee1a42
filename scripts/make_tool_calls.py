"""Write the bundled tool-calling data (data/legal-qa/tools_*.jsonl and tools.json).

Three functions a legal research assistant might call:

- ``define_term(term)``: the glossary entry of a legal term. The glossary is the bundled QA data: its
  reference answer for that term (data/legal-qa/train.jsonl).
- ``find_statute(area)``: where an area of law is written down. The bundled primer (corpus.txt) stands in
  for a statute database: the result is the opening sentence of the primer's section on that area.
- ``compute_deadline(start_date, days)``: a date plus a number of days (computed here, so always right).

Training rows: a question in one of six wordings per function, the assistant's call, and for half
of them the tool's result and the assistant's answer from it; one row in five carries the assistant's
reasoning (``reasoning_content``) before its call. Held-out rows: questions in two other wordings per
function (the same cue words, "define", "glossary", "statute", "legislation", a date and a number of
days, in sentences no training row uses), ending at the call, so eval scores which function is called
with which arguments. Deterministic.

    python scripts/make_tool_calls.py
"""

from __future__ import annotations

import datetime
import json
import random
import re
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data/legal-qa"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "define_term",
            "description": "Define a legal term.",
            "parameters": {"type": "object", "properties": {"term": {"type": "string"}}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "find_statute",
            "description": "Find the law of an area.",
            "parameters": {"type": "object", "properties": {"area": {"type": "string"}}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "compute_deadline",
            "description": "Add days to a date.",
            "parameters": {
                "type": "object",
                "properties": {"start_date": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    },
]
# (training wordings, held-out wordings) per function
WORDINGS = {
    "define_term": (
        [
            'Define the term "{term}".',
            'What does the glossary say about "{term}"?',
            "Give me the definition of {term}.",
            'What is the meaning of "{term}"?',
            "Please define {term}.",
            'Glossary: "{term}".',
        ],
        ['I need a definition: what does "{term}" mean?', "Find {term} in the glossary and define it."],
    ),
    "find_statute": (
        [
            "Which statute covers {area}?",
            "Find the statute on {area}.",
            "Where is the law of {area} written down?",
            "Show me the legislation for {area}.",
            "Statute for {area}, please.",
            "I need the code section on {area}.",
        ],
        ["What legislation governs {area}?", "Point me to the statute that deals with {area}."],
    ),
    "compute_deadline": (
        [
            "I was served on {start_date}. What is the deadline if I have {days} days?",
            "Count {days} days from {start_date} for me.",
            "What date is {days} days after {start_date}?",
            "A filing is due {days} days after {start_date}. When is that?",
            "Deadline: {start_date} plus {days} days?",
            "Starting {start_date}, when do {days} days run out?",
        ],
        [
            "My notice arrived on {start_date} and the period is {days} days. When does it end?",
            "If the clock starts on {start_date}, what is the date {days} days later?",
        ],
    ),
}
REASONING = {
    "define_term": "This asks what {term} means, so I check the glossary.",
    "find_statute": "The user wants the written law on {area}, so I search the statutes.",
    "compute_deadline": "A deadline question: I add {days} days to {start_date}.",
}
AREAS = {
    "contracts": "Contract law is about",
    "torts": "Tort law is about",
    "property": "Property law is about",
    "criminal law": "Criminal law is about",
    "civil procedure": "Civil procedure is the set",
    "evidence": "The law of evidence decides",
    "constitutional law": "Constitutional law is about",
    "business law": "Business law covers",
    "wills and trusts": "The law of wills and trusts",
    "employment": "Employment law is about",
    "intellectual property": "Intellectual property law protects",
    "remedies": "The law of remedies is about",
}
DAYS = [7, 10, 14, 20, 21, 28, 30, 45, 60, 90]
QUOTED = re.compile(r'"([^"]+)"')


def glossary() -> dict[str, str]:
    """Term -> reference answer, for the QA rows that name their term in quotes."""
    terms = {}
    for line in (DATA / "train.jsonl").read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        found = QUOTED.search(messages[1]["content"])
        if found:
            terms[found.group(1)] = messages[2]["content"]
    return terms


def statutes() -> dict[str, str]:
    """Area -> the opening sentence of the primer's section on it."""
    paragraphs = (DATA / "corpus.txt").read_text(encoding="utf-8").split("\n\n")
    found = {}
    for area, opening in AREAS.items():
        paragraph = next(p.strip() for p in paragraphs if p.strip().startswith(opening))
        found[area] = paragraph.split(". ")[0].rstrip(".") + "."
    return found


def arguments(function: str, rng: random.Random, terms: list[str]) -> dict:
    if function == "define_term":
        return {"term": rng.choice(terms)}
    if function == "find_statute":
        return {"area": rng.choice(list(AREAS))}
    start = datetime.date(2026, 1, 1) + datetime.timedelta(days=rng.randrange(365))
    return {"start_date": start.isoformat(), "days": rng.choice(DAYS)}


def result_and_answer(function: str, args: dict, terms: dict[str, str], laws: dict[str, str]) -> tuple[str, str]:
    if function == "define_term":
        return json.dumps({"term": args["term"], "entry": terms[args["term"]]}), terms[args["term"]]
    if function == "find_statute":
        text = laws[args["area"]]
        return json.dumps({"area": args["area"], "text": text}), f"The primer's section on {args['area']}: {text}"
    due = datetime.date.fromisoformat(args["start_date"]) + datetime.timedelta(days=args["days"])
    return json.dumps({"deadline": due.isoformat()}), f"The deadline is {due.isoformat()}."


def row(function: str, wording: str, args: dict, full: bool, think: bool, lookups) -> dict:
    call = {"type": "function", "function": {"name": function, "arguments": args}}
    assistant = {"role": "assistant", "content": "", "tool_calls": [call]}
    if think:
        assistant["reasoning_content"] = REASONING[function].format(**args)
    messages = [{"role": "user", "content": wording.format(**args)}, assistant]
    if full:
        result, answer = result_and_answer(function, args, *lookups)
        messages += [{"role": "tool", "name": function, "content": result}, {"role": "assistant", "content": answer}]
    return {"tools": TOOLS, "messages": messages}


def main() -> None:
    rng = random.Random(7)
    terms, laws = glossary(), statutes()
    lookups = (terms, laws)
    names = sorted(terms)
    train, held_out, seen_rows = [], [], set()

    def unique(function: str, wording: str, full: bool, think: bool) -> dict:
        """A row no earlier row repeats (a few draws; the small argument sets of find_statute run out)."""
        for _ in range(50):
            candidate = row(function, wording, arguments(function, rng, names), full, think, lookups)
            key = json.dumps(candidate, sort_keys=True)
            if key not in seen_rows:
                break
        seen_rows.add(key)
        return candidate

    for function, (seen, unseen) in WORDINGS.items():
        for i in range(120):
            train.append(unique(function, seen[i % len(seen)], full=i % 2 == 0, think=i % 5 == 0))
        for i in range(20):
            held_out.append(unique(function, unseen[i % len(unseen)], full=False, think=False))
    rng.shuffle(train)
    for name, rows in (("tools_train.jsonl", train), ("tools_eval.jsonl", held_out)):
        (DATA / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (DATA / "tools.json").write_text(json.dumps(TOOLS, indent=2) + "\n", encoding="utf-8")
    print(f"{len(train)} training rows, {len(held_out)} held-out rows, {len(terms)} glossary terms")


if __name__ == "__main__":
    main()
