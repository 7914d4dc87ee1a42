"""Regenerate the recipe reference table in README.md from the schema (between the markers)."""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_pipe.recipe.reference import explain_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- recipe-reference:start -->\n", "<!-- recipe-reference:end -->\n"

if __name__ == "__main__":
    text = README.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    README.write_text(pattern.sub(lambda _: START + explain_markdown() + END, text))
    print(f"updated {README}")
