"""``python -m qlora_pipe.cli``: the same as the ``qlora-pipe`` command."""

import sys

from qlora_pipe.cli import main

sys.exit(main())
