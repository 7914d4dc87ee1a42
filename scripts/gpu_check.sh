#!/usr/bin/env bash
# The GPU check in one command (under 8 minutes on one GPU): a Llama-3.1-8B-shaped QLoRA model with random
# weights, built in 4-bit on the GPU, capped to 24 GB: our default recipe at 2k/4k/8k tokens, the longest
# sequence that fits, the quickstart and a SIGTERM + resume through the CLI, torchtune's and unsloth's
# settings, flash-attention and the speed switches (docs/performance.md lists the stages).
# Result, written after every measurement: benchmarks/results/gpu-<date>-<gpu>.json (or into the folder
# $QLORA_PIPE_RESULTS names); a second run with --resume measures only what the first did not.
# On a GPU machine with no network: qlora-pipe wheelhouse (docs/performance.md) carries what it lacks.
#   bash scripts/gpu_check.sh            # on a machine with a CUDA GPU
#   bash scripts/gpu_check.sh --dry      # rehearsal on CPU with tiny shapes (about a minute)
# = python -m benchmarks gpu [--dry] from the repository root.
#
# Multi-GPU stage, only where nvidia-smi -L (or torch.cuda.device_count()) shows more than one GPU (not with
# --dry; about 5 minutes): a short FSDP-QLoRA run launched as a user launches it (accelerate launch
# --config_file accelerate/fsdp_qlora.yaml), on a 1.3B Llama-shaped model with random weights, beside the same run on one GPU. It prints and writes
# benchmarks/results/gpu-fsdp-<date>-<N>gpus.json: each run's peak torch.cuda.max_memory_allocated (rank 0's
# summary.json; FSDP gives every rank the same shapes) against `qlora-pipe plan --gpus N` (its allocated part),
# and trained tokens/s on N GPUs against one GPU. Skip it with QLORA_PIPE_SKIP_FSDP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_MININTERVAL=10

# The FSDP stage's recipe: the quickstart recipe on the wider model, packed to full 1024-token sequences (the
# planner plans full sequences), 12 steps.
FSDP_SETS=(
    --set model.name_or_path=models/fsdp-base --set data.packing=true --set data.max_length=1024
    --set training.micro_batch_size=2 --set training.max_steps=12 --set training.eval_steps=1000
    --set training.save_steps=1000 --set training.preview_prompts=[] --set training.optimizer=adamw_torch
    --set quantization.compute_dtype=bfloat16 --set quantization.quant_storage=bfloat16
    --set training.precision=bf16 --set training.report_to=[]
)

fsdp_stage() {
    local gpus=$1 work out
    work=$(mktemp -d)
    out="${QLORA_PIPE_RESULTS:-$PWD/benchmarks/results}/gpu-fsdp-$(date +%F)-${gpus}gpus.json"
    for item in data recipes accelerate; do ln -s "$PWD/$item" "$work/$item"; done
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    (cd "$work" && python -m qlora_pipe.cli build-quickstart-model --out models/quickstart-base --steps 5 >build.log 2>&1)
    # 1.3B parameters, the quickstart tokenizer (benchmarks/gpu_fsdp.py).
    (cd "$work" && python -m benchmarks.gpu_fsdp base)
    local one=0 many=0
    # One GPU for the baseline: a plain process that sees several would get transformers' DataParallel.
    (cd "$work" && CUDA_VISIBLE_DEVICES=0 python -m qlora_pipe.cli train recipes/quickstart.yaml "${FSDP_SETS[@]}" \
        --set run_name=one-gpu >one-gpu.log 2>&1) || one=$?
    (cd "$work" && accelerate launch --config_file accelerate/fsdp_qlora.yaml --num_processes "$gpus" \
        -m qlora_pipe.cli train recipes/quickstart.yaml "${FSDP_SETS[@]}" \
        --set run_name=fsdp >fsdp.log 2>&1) || many=$?
    (cd "$work" && python -m qlora_pipe.cli plan recipes/quickstart.yaml "${FSDP_SETS[@]}" --json >plan-1.json)
    (cd "$work" && python -m qlora_pipe.cli plan recipes/quickstart.yaml "${FSDP_SETS[@]}" --gpus "$gpus" \
        --json >plan-n.json)
    (cd "$work" && python -m benchmarks.gpu_fsdp report "$gpus" "$one" "$many" "$out")
}

status=0
# The whole check within 8 minutes on a GPU; QLORA_PIPE_CHECK_SECONDS lifts it for a slow CPU rehearsal.
timeout "${QLORA_PIPE_CHECK_SECONDS:-480}" python -m benchmarks gpu "$@" || status=$?

if command -v nvidia-smi >/dev/null; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
else
    gpus=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
fi
if [[ " $* " == *" --dry "* || "${QLORA_PIPE_SKIP_FSDP:-0}" == 1 || "${gpus:-0}" -lt 2 ]]; then
    echo "multi-GPU stage: skipped (${gpus:-0} GPU(s) seen)"
else
    export -f fsdp_stage
    timeout 420 bash -c "$(declare -p FSDP_SETS); fsdp_stage $gpus" || echo "multi-GPU stage failed (exit $?)"
fi
exit "$status"
