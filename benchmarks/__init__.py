"""qlora-pipe's benchmarks: every performance claim in the docs, measured from a clone of the repository.

Run from the repository root (not installed with the package)::

    python -m benchmarks cpu [--steps 45 --repeats 5 ...]    # < 10 minutes on 2 cores
    python -m benchmarks gpu [--dry]                         # the GPU check (bash scripts/gpu_check.sh)
    python -m benchmarks docs RESULTS.json                   # regenerate docs/performance.md's numbers
    python -m benchmarks data [--rows 100000] [--num-proc 1]
    python -m benchmarks export-memory [--hidden 2048 --layers 10]
    python -m benchmarks quickstart [--emulate-avx2]

Modules, one per comparison:

- ``cpu``: our training path vs a plain TRL + PEFT + bitsandbytes script (step time with the spread of
  the repeats, tokens/s, peak memory); QLoRA vs 16-bit LoRA vs full fine-tuning (peak memory, trainable
  parameters, supervised tokens trained); generation latency of the merged model vs the base and the
  unmerged adapter; export peak memory.
- ``workers``: one measurement per process for ``cpu`` (``python -m benchmarks.workers``), so peak RSS
  belongs to one side.
- ``batches``: the sha256 of every batch a training worker stepped on, and the supervised tokens in them;
  ``cpu`` fails unless both sides' lists are the same.
- ``gpu``: the GPU check: a Llama-3.1-8B-shaped QLoRA run under a 24 GB cap at 2k/4k/8k tokens (tokens/s,
  MFU, peak memory beside the planner's prediction), the longest sequence that fits, and the speed switches.
- ``gpu_model``: the random-weight Llama built directly in 4-bit NF4 that ``gpu`` trains.
- ``report``: a ``cpu`` results file -> markdown table, PNG chart and docs/performance.md's section.
- ``data_prep``: data-stage speed, our preparation vs a bare ``datasets.map``, first run and cached.
- ``export_memory``: peak memory of our streaming export vs load + PEFT ``merge_and_unload`` + save.
- ``quickstart``: wall times of the offline quickstart (build, train, export) on this CPU, or as on an
  AVX2-only one.

Results go to benchmarks/results/.
"""
