"""One entry for every benchmark: ``python -m benchmarks COMMAND [ARGS]`` from the repository root."""

from __future__ import annotations

import importlib
import sys

# command -> (module, what it measures); each module's main(argv) parses its own flags.
COMMANDS = {
    "cpu": ("benchmarks.cpu", "CPU benchmarks: ours vs plain TRL, QLoRA vs LoRA vs full, latency, export"),
    "gpu": ("benchmarks.gpu", "the GPU check (--dry: tiny shapes on CPU)"),
    "docs": ("benchmarks.report", "regenerate docs/performance.md from a cpu or gpu results file: docs RESULTS.json"),
    "data": ("benchmarks.data_prep", "data-stage speed vs a bare datasets.map"),
    "export-memory": ("benchmarks.export_memory", "peak memory of our export vs PEFT's merge_and_unload"),
    "quickstart": ("benchmarks.quickstart", "the offline quickstart's wall times (--emulate-avx2)"),
    "methods": ("benchmarks.methods", "full, prompt, prefix, (IA)3, LoRA, QLoRA, DoRA: same model, data and steps"),
    "gguf": ("benchmarks.gguf_table", "trained vs merged vs each GGUF type (llama.cpp) on an exported run"),
    "random-model": (
        "benchmarks.random_model",
        "a random-weight checkpoint of a real architecture (7B by default), sharded, one shard in memory",
    ),
    "plan-vs-cpu": (
        "benchmarks.plan_vs_cpu",
        "the planner's terms against torch's allocations in one real training step on this CPU",
    ),
    "scale": (
        "benchmarks.scale",
        "one row of the scale table: a real model through train, verified export and GGUF, with host peaks",
    ),
    "serving": (
        "benchmarks.serving_table",
        "every way to serve a run (bf16/fp16/fp32 merges, unmerged, GGUF), checked",
    ),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help}" for name, (_, help) in COMMANDS.items()]
    head = "usage: python -m benchmarks {" + ",".join(COMMANDS) + "} [ARGS]"
    tail = "`python -m benchmarks COMMAND --help` lists a command's options."
    return "\n".join([head, "", "commands:", *lines, "", tail])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"{usage()}\n\nunknown command: {argv[0]}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
