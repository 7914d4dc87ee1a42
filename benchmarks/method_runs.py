"""One fine-tuning method, trained and measured in this process (benchmarks/methods.py runs them in order).

Every method gets the same model, the same batches in the same order, the same number of optimizer
steps and the same plain loop (AdamW, constant learning rate, loss from the model's own forward), so
only the method differs. Frozen bases are 16-bit (bf16 where this CPU runs it natively, else fp32);
what trains is fp32 (PEFT's adapters; full fine-tuning keeps fp32 weights and computes in the base's
dtype under autocast). Peak memory is the process's resident peak while the method trains, measured
after resetting the kernel's high-water mark (/proc/self/clear_refs).
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

GiB = 2**30


@dataclass(frozen=True)
class Method:
    name: str
    learning_rate: float
    architecture: str  # what serving the result changes, merged or not
    mergeable: bool


LORA_MERGED = "unmerged: a low-rank branch per layer; merged: no"
METHODS = {
    "full": Method("full fine-tuning", 3e-4, "no", False),
    "prompt_tuning": Method("prompt tuning (20 virtual tokens)", 3e-2, "no; 20 virtual tokens per input", False),
    "prefix_tuning": Method("prefix tuning (20 virtual tokens)", 1e-2, "no; 20 key/value prefixes per layer", False),
    "ia3": Method("(IA)³", 3e-3, "unmerged: scaling vectors in attention and MLP; merged: no", True),
    "lora": Method("LoRA r=16, all linear (16-bit base)", 3e-3, LORA_MERGED, True),
    "qlora": Method("QLoRA r=16, all linear (4-bit NF4 base)", 3e-3, LORA_MERGED + " (into 16-bit weights)", True),
    "dora": Method("DoRA r=16, all linear (16-bit base)", 3e-3, "unmerged: LoRA + magnitudes; merged: no", True),
}


def reset_peak() -> None:
    gc.collect()
    from qlora_pipe.export.tensor_checks import release_freed_memory

    release_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def base_dtype() -> torch.dtype:
    from qlora_pipe.machine.hardware import detect_hardware

    return torch.bfloat16 if detect_hardware("cpu").native_bf16 else torch.float32


def load(model_dir: str, key: str):
    """The model to train for this method, and its trainable parameter count."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = base_dtype()
    if key == "full":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return model, sum(p.numel() for p in model.parameters())
    quantized = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, quantization_config=quantized if key == "qlora" else None
    )
    config = {
        "prompt_tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
        "prefix_tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
        "ia3": lambda: IA3Config(
            task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
        "lora": lambda: LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear"),
        "qlora": lambda: LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear"),
        "dora": lambda: LoraConfig(
            task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear", use_dora=True
        ),
    }[key]()
    model = get_peft_model(model, config)
    return model, model.get_nb_trainable_parameters()[0]


def batches(rows: list[dict], size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches in the given order (padding masked out of attention and loss)."""
    out = []
    for start in range(0, len(rows), size):
        group = rows[start : start + size]
        width = max(len(r["input_ids"]) for r in group)
        ids = torch.full((len(group), width), pad_id)
        labels = torch.full((len(group), width), -100)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, row in enumerate(group):
            n = len(row["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(row["input_ids"]), torch.tensor(row["labels"]), 1
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return out


def loss_of(model, batch: dict[str, torch.Tensor], autocast: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return model(**batch).loss


@torch.no_grad()
def eval_loss(model, eval_batches: list[dict[str, torch.Tensor]], autocast: bool) -> float:
    model.eval()
    total = count = 0.0
    for batch in eval_batches:
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total += loss_of(model, batch, autocast).item() * tokens
        count += tokens
    model.train()
    return total / max(count, 1)


def storage_bytes(model, key: str) -> int:
    """What one more task costs on disk: the adapter's files, or the whole model in 16-bit for full tuning."""
    with tempfile.TemporaryDirectory() as folder:
        if key == "full":
            model.to(base_dtype()).save_pretrained(folder)
        else:
            model.save_pretrained(folder)
        return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


@torch.no_grad()
def generation_ms(models: dict, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per generated token of each model, greedy, exactly new_tokens tokens; the models
    take turns in every repeat (after one warm-up each), so drift in the machine's speed hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model.eval()
    for repeat in range(repeats + 1):
        for name, model in models.items():
            started = time.perf_counter()
            model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
            )  # fmt: skip
            if repeat:  # the first round is a warm-up
                times[name].append((time.perf_counter() - started) * 1000 / new_tokens)
    return {name: statistics.median(values) for name, values in times.items()}


def merged_copy(model_dir: str, trained, key: str):
    """The tuned model merged into 16-bit weights, as served (QLoRA's adapter onto the 16-bit base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        trained.save_pretrained(folder)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=base_dtype())
        return PeftModel.from_pretrained(base, folder).merge_and_unload()


def run_method(key: str, model_dir: str, train_rows: list[dict], eval_rows: list[dict], settings: dict) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(settings["seed"])
    reset_peak()
    started = time.time()
    model, trainable = load(model_dir, key)
    total = settings["total_params"]
    autocast = base_dtype() == torch.bfloat16
    pad = settings["pad_token_id"]
    train_batches = batches(train_rows, settings["micro_batch_size"], pad)
    eval_batches = batches(eval_rows, settings["micro_batch_size"], pad)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=METHODS[key].learning_rate, weight_decay=0.0)
    model.train()
    before = eval_loss(model, eval_batches, autocast)
    for step in range(settings["steps"]):
        loss = loss_of(model, train_batches[step % len(train_batches)], autocast)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = eval_loss(model, eval_batches, autocast)
    peak = peak_rss()
    seconds = time.time() - started
    del optimizer
    storage = storage_bytes(model, key)
    prompt = torch.tensor([settings["prompt_ids"]])
    models = {
        "base": AutoModelForCausalLM.from_pretrained(model_dir, dtype=base_dtype()),
        "unmerged": model.to(base_dtype()) if key == "full" else model,
    }
    if METHODS[key].mergeable:
        models["merged"] = merged_copy(model_dir, model, key)
    ms = generation_ms(models, prompt, settings["new_tokens"], settings["latency_repeats"])
    return {
        "method": METHODS[key].name,
        "learning_rate": METHODS[key].learning_rate,
        "trainable_params": trainable,
        "trainable_percent": 100 * trainable / total,
        "peak_rss_bytes": peak,
        "storage_bytes": storage,
        "ms_per_token_base": ms["base"],
        "ms_per_token_unmerged": ms["unmerged"],
        "ms_per_token_merged": ms.get("merged"),
        "architecture_change": METHODS[key].architecture,
        "eval_loss_before": before,
        "eval_loss_after": after,
        "train_seconds": round(seconds, 1),
    }
