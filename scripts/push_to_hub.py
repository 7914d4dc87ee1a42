"""Publish a run to the Hub: same as `qlora-pipe push RUN_DIR --repo-id USER/NAME [...]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_pipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["push", *sys.argv[1:]]))
