"""Merge a finished run into its base: same as `qlora-pipe export [RUN_DIR] [--out DIR] ...`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_pipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
