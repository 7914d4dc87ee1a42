"""Pretrain the tiny offline base model of recipes/quickstart.yaml: `qlora-pipe build-quickstart-model`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_pipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["build-quickstart-model", *sys.argv[1:]]))
