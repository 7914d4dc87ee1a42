#!/usr/bin/env bash
# The GPU check in one command (under 8 minutes on one GPU): a Llama-3.1-8B-shaped QLoRA model with random
# weights, built in 4-bit on the GPU, capped to 24 GB: our default recipe at 2k/4k/8k tokens, the longest
# sequence that fits, the quickstart and a SIGTERM + resume through the CLI, torchtune's and unsloth's
# settings, flash-attention and the speed switches (docs/performance.md lists the stages).
# Result, written after every measurement: benchmarks/results/gpu-<date>-<gpu>.json; a second run with
# --resume measures only what the first did not.
#   bash scripts/gpu_check.sh            # on a machine with a CUDA GPU
#   bash scripts/gpu_check.sh --dry      # rehearsal on CPU with tiny shapes (about a minute)
# = python -m benchmarks gpu [--dry] from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_MININTERVAL=10
exec timeout 480 python -m benchmarks gpu "$@"
