"""One measurement per process, for benchmarks/cpu.py: each prints one JSON line as its last output.

    python -m benchmarks.workers ours|plain|full|latency JSON_ARGS     (from the repository root)

A fresh process per measurement makes peak RSS (ru_maxrss only ever grows) belong to that side alone.
``ours`` runs qlora_pipe.training.stage.run_training, the code `qlora-pipe train` runs; ``plain`` is the
usual TRL + PEFT + bitsandbytes script with the same model, rows and settings; ``full`` is the same
script without PEFT (full fine-tuning); ``latency`` times greedy generation of base, merged and
adapter-unmerged models, interleaved.

Training workers report the sha256 of every batch they trained on and the supervised tokens in those
batches (benchmarks/batches.py), so benchmarks/cpu.py can prove both sides did the same work.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.batches import BatchLog

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data/legal-qa/train.jsonl"


# The settings both training sides share: qlora-pipe's defaults, except a short run.
class TrainClock:
    """Wall and CPU seconds of trainer.train() proper, the same callback on both sides.

    ``steady``: from the end of the first optimizer step to the end of the last one, so one-time
    costs at the start and end of train() (tracker start-up, first-step allocation) are left out
    and what remains is the cost of a training step with everything each side runs around it.

    CPU seconds stay meaningful when other jobs share the machine: wall time then measures them too.
    """

    def __new__(cls):
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                self.wall, self.cpu = time.perf_counter(), time.process_time()
                self.step_ends: list[tuple[float, float]] = []

            def on_step_end(self, args, state, control, **kwargs):
                self.step_ends.append((time.perf_counter(), time.process_time()))

            def on_train_end(self, args, state, control, **kwargs):
                self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

        return Clock()


def steady(clock) -> dict[str, float]:
    (wall0, cpu0), (wall1, cpu1) = clock.step_ends[0], clock.step_ends[-1]
    return {
        "steady_seconds": wall1 - wall0,
        "steady_cpu_seconds": cpu1 - cpu0,
        "steady_steps": len(clock.step_ends) - 1,
    }


SETTINGS = {"micro_batch_size": 8, "learning_rate": 2e-4, "warmup_ratio": 0.03, "max_grad_norm": 0.3, "seed": 42}


def ours(args: dict[str, Any]) -> dict[str, Any]:
    """The real `qlora-pipe train` path (checks, data stage, 4-bit load, PipeTrainer with its callbacks)."""
    from qlora_pipe.recipe import validate_recipe
    from qlora_pipe.training.stage import run_training

    raw = {
        "run_name": "ours",
        "output_dir": args["out"],
        "seed": SETTINGS["seed"],
        "model": {"name_or_path": args["model"]},
        "quantization": {"enabled": args.get("quantized", True)},
        "data": {
            "train_path": str(TRAIN),
            "max_length": args["max_length"],
            "max_train_samples": args["rows"],
            "cache_dir": str(Path(args["out"]) / "data-cache"),
        },
        "training": {
            "max_steps": args.get("max_steps", -1),
            "micro_batch_size": SETTINGS["micro_batch_size"],
            "gradient_accumulation_steps": 1,
            "learning_rate": SETTINGS["learning_rate"],
            "warmup_ratio": SETTINGS["warmup_ratio"],
            "max_grad_norm": SETTINGS["max_grad_norm"],
            "save_steps": 10_000,
        },
    }
    clock, batches = TrainClock(), BatchLog().install()
    from qlora_pipe.plan.measure import measure_weight_bytes

    result = run_training(validate_recipe(raw, "bench"), overwrite=True, callbacks=(clock,))
    summary = result.summary
    if summary["supervised_tokens"] != batches.supervised_tokens:  # two counts of the same batches
        counts = f"summary {summary['supervised_tokens']}, batches {batches.supervised_tokens}"
        raise RuntimeError(f"supervised tokens disagree: {counts}")
    adapter = Path(args["out"]) / "ours" / "adapter_model.safetensors"
    return {
        **batches.result(),
        "train_seconds": clock.wall,
        "train_cpu_seconds": clock.cpu,
        **steady(clock),
        "steps": summary["steps"],
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
        "saved_bytes": adapter.stat().st_size,
        # Model tensors (4-bit data with its quantization constants), the same count on every side.
        "weights_bytes": measure_weight_bytes(result.model).total,
    }


def plain_trainer(args: dict[str, Any], peft: bool, clock):
    """A TRL + PEFT + bitsandbytes script as the TRL docs write it; peft=False: full fine-tuning in bf16."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    gpu = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(args["model"])
    rows = load_dataset("json", data_files=str(TRAIN), split="train").select(range(args["rows"]))
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        args["model"],
        quantization_config=quant if peft else None,
        dtype=torch.bfloat16,
        device_map={"": 0 if gpu else "cpu"},
    )
    config = SFTConfig(
        output_dir=str(Path(args["out"]) / "plain"),
        seed=SETTINGS["seed"],
        data_seed=SETTINGS["seed"],
        max_steps=args.get("max_steps", -1),
        num_train_epochs=1,
        per_device_train_batch_size=SETTINGS["micro_batch_size"],
        learning_rate=SETTINGS["learning_rate"],
        lr_scheduler_type="cosine",
        warmup_steps=SETTINGS["warmup_ratio"],
        max_grad_norm=SETTINGS["max_grad_norm"],
        optim="paged_adamw_8bit" if gpu else "adamw_8bit",
        bf16=True,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        assistant_only_loss=True,
        max_length=args["max_length"],
        save_strategy="no",
        report_to="none",
        use_cpu=not gpu,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=rows,
        processing_class=tokenizer,
        peft_config=lora if peft else None,
        callbacks=[clock],
    )
    return trainer


def plain(args: dict[str, Any], peft: bool = True) -> dict[str, Any]:
    from qlora_pipe.plan.measure import measure_weight_bytes
    from qlora_pipe.training.progress import peak_memory_bytes

    clock, batches = TrainClock(), BatchLog().install()
    trainer = plain_trainer(args, peft, clock)
    trainer.train()
    model = trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    saved = Path(args["out"]) / "saved"
    if not peft:  # full fine-tuning must keep the whole model per task
        model.save_pretrained(saved)
    return {
        **batches.result(),  # the supervised tokens of the batches trained on, not the dataset's
        "train_seconds": clock.wall,
        "train_cpu_seconds": clock.cpu,
        **steady(clock),
        "steps": trainer.state.global_step,
        "peak_memory_bytes": peak_memory_bytes(),
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in model.parameters()),
        "saved_bytes": sum(f.stat().st_size for f in saved.glob("*.safetensors")) if not peft else None,
        "weights_bytes": measure_weight_bytes(model).total,
    }


def latency(args: dict[str, Any]) -> dict[str, Any]:
    """Greedy decode time of base, merged and PEFT-unmerged models, interleaved, medians."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def load(path: str):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()

    models = {
        "base": load(args["base"]),
        "merged": load(args["merged"]),
        "adapter_unmerged": PeftModel.from_pretrained(load(args["base"]), args["adapter"]).eval(),
    }
    prompt = torch.randint(0, 2000, (1, args["prompt_tokens"]), generator=torch.Generator().manual_seed(0))
    new = args["new_tokens"]
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up: first-call allocations are not latency
            model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        for i in range(args["repeats"]):
            order = list(models) if i % 2 == 0 else list(reversed(models))
            for name in order:
                started = time.perf_counter()
                models[name].generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
                times[name].append(time.perf_counter() - started)
    return {
        name: {"median_seconds": statistics.median(t), "ms_per_token": 1000 * statistics.median(t) / new, "runs": t}
        for name, t in times.items()
    }


WORKERS = {"ours": ours, "plain": plain, "full": lambda a: plain(a, peft=False), "latency": latency}

if __name__ == "__main__":
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    result = WORKERS[sys.argv[1]](json.loads(sys.argv[2]))
    print("BENCH_RESULT " + json.dumps(result))
