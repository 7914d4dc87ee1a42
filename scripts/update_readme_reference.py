"""Regenerate the recipe reference table in docs/recipe.md from the schema (between the markers)."""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_pipe.recipe.reference import explain_markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipe.md"
START, END = "<!-- recipe-reference:start -->\n", "<!-- recipe-reference:end -->\n"

if __name__ == "__main__":
    text = DOC.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{DOC} has no {START.strip()} ... {END.strip()} markers")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    DOC.write_text(pattern.sub(lambda _: START + explain_markdown() + END, text))
    print(f"updated {DOC}")
