"""The converter's own process: ``python -m qlora_pipe.export.converter_process ARGS`` runs compat/llama_cpp.py's
``main`` (llama.cpp's converter) and reports its peak host memory on its last line, which the parent reads
back (export/gguf.py, converter_memory)."""

from __future__ import annotations

import json
import sys

from qlora_pipe.compat.llama_cpp import MEMORY_LINE, main
from qlora_pipe.machine.host_memory import HostMemory

if __name__ == "__main__":
    memory = HostMemory()
    try:
        with memory:
            code = main(sys.argv[1:])
    finally:
        print(f"{MEMORY_LINE} {json.dumps(memory.report())}", flush=True)
    sys.exit(code)
