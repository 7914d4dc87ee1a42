"""Does the merged model reproduce the trained one? Logits on held-out prompts, side by side.

The reference is the model as trained: the 4-bit base (prepared as in training) plus the adapter.
The merged model is loaded with plain transformers. On the run's eval examples (the rendered
chat, exactly as training saw it) both give logits; we report the max and mean absolute logit
difference, the top-1 agreement on the tokens that carry loss, and the eval loss of each.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import torch

from qlora_pipe.export.stored_logits import StoredLogits, row_logits
from qlora_pipe.export.verdict import judge
from qlora_pipe.finite import worst
from qlora_pipe.machine.hardware import dtype_for_inference
from qlora_pipe.recipe import Recipe
from qlora_pipe.runs import RunDir

log = logging.getLogger(__name__)


@torch.no_grad()
def compare(reference, candidate, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
    """Both models on each row in turn: only one row's logits of each are alive at a time. ``reference`` may be
    a model or the trained model's StoredLogits."""
    max_diff, diff_sum, abs_sum, count = 0.0, 0.0, 0.0, 0
    agree = total = 0
    losses = {"trained": 0.0, "merged": 0.0}
    for index, row in enumerate(rows):
        a = reference.row(index) if isinstance(reference, StoredLogits) else row_logits(reference, row)
        b = row_logits(candidate, row).to(a.device)
        targets = torch.tensor(row["labels"][1:], device=a.device)
        mask = targets != -100
        for key, logits in (("trained", a), ("merged", b)):
            losses[key] += torch.nn.functional.cross_entropy(logits[:-1][mask], targets[mask], reduction="sum").item()
        diff = (a - b).abs_()
        max_diff, diff_sum = worst(max_diff, diff.max().item()), diff_sum + diff.sum().item()
        del diff
        abs_sum, count = abs_sum + a.abs().sum().item(), count + a.numel()
        agree += int((a[:-1].argmax(-1) == b[:-1].argmax(-1))[mask].sum())
        total += int(mask.sum())
        del a, b
    ref_loss, new_loss = losses["trained"] / max(total, 1), losses["merged"] / max(total, 1)
    result = {
        "examples": len(rows),
        "trained_tokens_compared": total,
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": diff_sum / max(count, 1),
        "mean_abs_logit": abs_sum / max(count, 1),
        "top1_agreement": agree / max(total, 1),
        "eval_loss_trained": ref_loss,
        "eval_loss_merged": new_loss,
    }
    result["relative_loss_change"] = abs(new_loss - ref_loss) / max(abs(ref_loss), 1e-9)
    result["relative_logit_diff"] = result["mean_abs_logit_diff"] / max(result["mean_abs_logit"], 1e-9)
    return judge(result, None)


def noise_compute(resolved, served: torch.dtype | None) -> str | None:
    """The compute dtype of the copy that measures the reference's noise (see reference_noise), or None when
    no copy is loaded. ``resolved``: the recipe with concrete dtypes; ``served``: the export's dtype."""
    compute = resolved.quantization.compute_dtype if resolved.quantization.enabled else resolved.training.precision
    if compute not in ("float32", "fp32"):
        return "float32"
    return "bfloat16" if served == torch.bfloat16 else None


def reference_noise(
    recipe: Recipe, run: RunDir, trained, rows: list[dict[str, list[int]]], served: torch.dtype | None = None
) -> dict[str, Any]:
    """The trained model against itself computed in another dtype, on the same rows: how far the reference is
    from itself. A run computing in 16 bits: against fp32 compute (4-bit base dequantized in fp32, adapter in
    fp32). A run computing in fp32 whose merged model is served in bf16 (``served``): against bf16 compute,
    the arithmetic bf16 weights are served with, since rounding every weight to bf16 once is what such an
    export costs whatever the merge (2.5% of the mean logit on a random-weight 7B, whose logits are small).
    Zero otherwise: an fp32 run served in fp32 (or fp16, checked against the fixed floors)."""
    from qlora_pipe.methods import method_for

    load_trained_model = method_for(recipe).load_trained
    resolved = recipe  # a run's recorded recipe: its dtypes settled when it trained
    compute = resolved.quantization.compute_dtype if resolved.quantization.enabled else resolved.training.precision
    against = noise_compute(resolved, served)
    if against is None:
        return {"compute_dtype": "float32", "measured": False, "relative_loss_change": 0.0, "relative_logit_diff": 0.0}
    in_fp32 = against == "bfloat16"
    other = resolved.model_copy(deep=True)
    if in_fp32:  # the adapter, saved in fp32, in bf16 too; 4-bit weights kept in a float storage stay as stored
        other.training.precision, other.quantization.compute_dtype = "bf16", "bfloat16"
        copy = load_trained_model(other, run.root)
        for name, param in copy.named_parameters():
            if "lora_" in name and param.dtype == torch.float32:
                param.data = param.data.to(torch.bfloat16)
    else:
        other.training.precision, other.quantization.compute_dtype = "fp32", "float32"
        if other.quantization.quant_storage != "uint8":
            other.quantization.quant_storage = "float32"
        copy = load_trained_model(other, run.root)
        for param in copy.parameters():
            if param.dtype in (torch.bfloat16, torch.float16) and param.is_floating_point():
                param.data = param.data.float()  # the adapter and any 16-bit leftovers: fp32 throughout
    numbers = compare(trained, copy, rows)
    del copy
    keys = ("relative_loss_change", "relative_logit_diff", "mean_abs_logit_diff", "top1_agreement")
    found = {"compute_dtype": "float32", "against": "bfloat16"} if in_fp32 else {"compute_dtype": compute}
    return {**found, "measured": True, **{k: numbers[k] for k in keys}}


Rows = tuple[list[dict[str, list[int]]], str]  # the rows compared, and the split they come from


def fidelity_rows(recipe: Recipe, tokenizer, limit: int, run: RunDir | None = None) -> Rows:
    """The first ``limit`` eval rows (train rows without an eval split) as training saw them; for a
    preference run, each pair's prompt with its chosen answer. A GRPO run's prompts are read with the
    columns its data report recorded for each reward: no reward code is imported."""
    from qlora_pipe.methods import method_for

    method = method_for(recipe)
    data = method.finished_run_data(recipe, tokenizer, run)  # the run's own data stage, whatever its method
    source = data.eval if data.eval is not None else data.train
    rows = [source[i] for i in range(min(limit, len(source)))]
    split = "eval" if data.eval is not None else "train"
    return method.fidelity_rows(recipe, tokenizer, rows), split


def verification_rows(recipe: Recipe, run: RunDir, limit: int = 16) -> Rows | None:
    """The rows the verification compares, read before anything is written: a data problem (a file moved, a
    recorded path that no longer resolves) refuses the export before the merge. None for a classifier (its
    check reads its own held-out rows)."""
    from qlora_pipe.methods import method_for
    from qlora_pipe.models.loading import load_run_tokenizer

    if method_for(recipe).reads_own_check_rows:
        return None
    return fidelity_rows(recipe, load_run_tokenizer(run.root), limit, run)


def verify_merged(
    recipe: Recipe,
    run: RunDir,
    merged_dir: Path,
    dtype: torch.dtype,
    limit: int = 16,
    rows: Rows | None = None,
    streamed: bool = False,
) -> dict[str, Any]:
    """Fidelity of the merged model against the trained model on the run's eval (or train) examples (``rows``:
    verification_rows' answer, when read beforehand; ``streamed``: the merged model read a block at a time)."""
    from qlora_pipe.methods import method_for

    method = method_for(recipe)
    own = method.check_merged(recipe, run, merged_dir, dtype)
    if own is not None:  # a method with its own check (a classifier's class logits)
        return own
    auto = method.auto_class
    if dtype != torch.float16 or dtype_for_inference("float16") == "float16":
        load = lambda: served_model(merged_dir, dtype, streamed=streamed, auto_class=auto)  # noqa: E731
        return verify_served(recipe, run, load, limit, rows, dtype)
    from qlora_pipe.export.float16_range import ActivationRange

    watch = ActivationRange()  # fp16 weights checked in fp32 here: would float16 hold the activations?
    load = lambda: watch.attach(served_model(merged_dir, dtype, streamed=streamed, auto_class=auto))  # noqa: E731
    result = verify_served(recipe, run, load, limit, rows, dtype)
    if overflow := watch.overflow():
        result["float16_overflow"], result["passed"] = overflow, False
    return result


def served_model(
    folder: Path,
    dtype: torch.dtype,
    adapter: Path | None = None,
    streamed: bool = False,
    auto_class: str = "AutoModelForCausalLM",
):
    """A served folder loaded with plain transformers (``auto_class``; plus a PEFT adapter on it, for the unmerged
    export; or its decoder blocks read from its files as they run, ``streamed``). Where this CPU emulates 16-bit
    matmuls the weights are read into fp32 (exact) and run there."""
    import transformers

    from qlora_pipe.models.loading import training_device

    dtype = getattr(torch, dtype_for_inference(str(dtype).removeprefix("torch.")))
    if streamed:
        from qlora_pipe.export.streamed_model import load_streamed

        return load_streamed(folder, dtype, str(training_device()))
    model = getattr(transformers, auto_class).from_pretrained(folder, dtype=dtype, device_map={"": training_device()})
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def verify_served(
    recipe: Recipe,
    run: RunDir,
    load_served,
    limit: int = 16,
    rows: Rows | None = None,
    served: torch.dtype | None = None,
) -> dict[str, Any]:
    """The trained model against what ``load_served()`` returns (its weights in ``served``), on the run's eval
    (or train) examples."""
    from qlora_pipe.methods import method_for

    recipe = recipe.model_copy(deep=True)
    rows, split = rows or verification_rows(recipe, run, limit)
    trained = method_for(recipe).load_trained(recipe, run.root)
    noise = reference_noise(recipe, run, trained, rows, served)
    # One model at a time: the trained model's logits go to disk, then the served model loads.
    with StoredLogits(trained, rows, near=run.root) as stored:
        del trained
        gc.collect()
        served = load_served()
        result = compare(stored, served, rows)
        del served
    result = judge(result, noise)
    result["split"] = split
    return result


def fidelity_table(result: dict[str, Any]) -> str:
    lines = [
        f"fidelity on {result['examples']} {result.get('split', '')} examples "
        f"({result['trained_tokens_compared']} answer tokens):",
        f"  eval loss   trained (4-bit + adapter) {result['eval_loss_trained']:.5f}   "
        f"merged {result['eval_loss_merged']:.5f}   (change {100 * result['relative_loss_change']:.3f}%)",
        f"  logit diff max {result['max_abs_logit_diff']:.4f}  mean {result['mean_abs_logit_diff']:.5f} "
        f"({100 * result['relative_logit_diff']:.2f}% of the mean logit)   "
        f"top-1 agreement {100 * result['top1_agreement']:.2f}%",
    ]
    noise = result.get("reference_noise")
    if noise and noise.get("measured"):
        lines.append(
            f"  reference noise ({noise['compute_dtype']} vs {noise.get('against', 'float32')} compute): "
            f"loss {100 * noise['relative_loss_change']:.3f}%  mean logit {100 * noise['relative_logit_diff']:.2f}%"
        )
    if result.get("delta_kept"):
        from qlora_pipe.export.delta_kept import kept_line

        lines.append(kept_line(result["delta_kept"]))
    if overflow := result.get("float16_overflow"):
        lines.append(
            f"  float16 overflow: {overflow['module']} outputs {overflow['largest_activation']:.4g} "
            f"(float16 holds {overflow['float16_max']:.0f})"
        )
    criteria = result["criteria"]
    lines.append(
        f"  {'PASSED' if result['passed'] else 'FAILED'} (needs loss change <= "
        f"{100 * criteria['max_relative_loss_change']:.2f}% and mean logit diff <= "
        f"{100 * criteria['max_relative_logit_diff']:.2f}% of the mean logit"
        f"{', and delta kept >= ' + str(criteria['min_mean_delta_kept']) if 'min_mean_delta_kept' in criteria else ''})"
    )
    return "\n".join(lines)
