"""`qlora-pipe export RUN --unmerged`: serve the base the adapter was trained against, with the adapter beside it.

A merge rounds every merged weight once to the export dtype; for a delta smaller than the weight's rounding
step, some of it is lost. Served unmerged, the delta is never rounded into a weight: the engine adds the
adapter's low-rank product in its compute. The output (``RUN/unmerged/`` by default):

- ``base/``: the base as training saw it: the NF4 weights dequantized (in fp32, then cast once to the
  export dtype: by default the run's compute dtype, in which that cast gives exactly training's weights),
  with the tokenizer, the serving chat template and the generation config stopping at the end of turn;
- ``adapter/``: the run's PEFT adapter, naming ``base/`` as its base (vLLM ``--lora-modules``, PEFT);
- ``fidelity.json``: transformers + PEFT on those two folders against the trained model, the same check as
  the merged export's;
- with ``--format gguf``: ``gguf/`` with the base GGUF, the adapter as a LoRA GGUF (llama.cpp ``--lora``)
  and an Ollama Modelfile with ``FROM`` and ``ADAPTER`` (qlora_pipe/export/lora_gguf.py).

Written into ``unmerged.partial/`` and renamed only once complete and checked, as the merged export.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from qlora_pipe.errors import UserError
from qlora_pipe.export.command import (
    EXPORT_INFO,
    FIDELITY,
    PARTIAL_MARKER,
    ExportResult,
    check_export_target,
    generation_defaults,
    write_configs,
)
from qlora_pipe.export.merge import base_checkpoint_dir, merge_stream
from qlora_pipe.export.serving import make_serving_files
from qlora_pipe.models.base_record import recorded_source, run_recipe
from qlora_pipe.models.loading import DTYPES
from qlora_pipe.recipe import Recipe
from qlora_pipe.runs import RunDir, resolve_run, write_json_atomic
from qlora_pipe.sizes import parse_size

GGUF_OF_DTYPE = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}  # the base GGUF bit-equal to base/


def trained_dtype(recipe: Recipe) -> str:
    """The dtype the adapter met the base weights in: the 4-bit compute dtype, or the training precision."""
    resolved = recipe  # a run's recorded recipe: its dtypes settled when it trained
    if resolved.quantization.enabled:
        return resolved.quantization.compute_dtype
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(resolved.training.precision, "float32")


def export_unmerged(
    run_dir: str | Path | None = None,
    out: str | Path | None = None,
    dtype: str | None = None,
    verify: bool | None = None,
    gguf_type: str | None = None,
) -> ExportResult:
    """Write (and by default verify) the base + adapter pair; with ``gguf_type`` also their GGUF files (``auto``:
    the base's own dtype, so the base GGUF is bit-equal to it)."""
    run = resolve_run(run_dir)
    with run.exporting():
        return _export(run, out, dtype, verify, gguf_type)


def _export(run: RunDir, out, dtype: str | None, verify: bool | None, gguf_type: str | None) -> ExportResult:
    started = time.time()
    recipe = run_recipe(run, "export --unmerged")
    from qlora_pipe.methods import method_for

    if refusal := method_for(recipe).refusal("export --unmerged", run):
        raise UserError(refusal)
    if gguf_type is not None:
        from qlora_pipe.export.gguf import check_gguf_type, lora_converter_dir
        from qlora_pipe.export.lora_gguf import lora_refusal
        from qlora_pipe.export.merge import load_lora

        dtype_name = dtype or trained_dtype(recipe)
        gguf_type = GGUF_OF_DTYPE[dtype_name] if gguf_type == "auto" else gguf_type
        check_gguf_type(gguf_type)
        lora_converter_dir()
        _, replaced, config = load_lora(run)
        why = lora_refusal(config, sorted(replaced))
        if why:
            raise UserError(f"export --unmerged --format gguf: llama.cpp cannot apply this adapter as trained: {why}")
    dtype_name = dtype or trained_dtype(recipe)
    verify = recipe.export.verify if verify is None else verify
    out = Path(out) if out else run.root / "unmerged"
    partial = out.with_name(out.name + ".partial")
    check_export_target(out, partial)
    base = base_checkpoint_dir(recipe)
    rows = None
    if verify:  # the rows compared, read first: a data problem refuses the export before anything is written
        from qlora_pipe.export.fidelity import verification_rows

        rows = verification_rows(recipe, run)
    shutil.rmtree(partial, ignore_errors=True)  # ours (checked): a failed earlier export
    (partial / "base").mkdir(parents=True)
    (partial / PARTIAL_MARKER).write_text("an export in progress, or one that failed its checks\n")
    try:
        written = _write_pair(recipe, run, base, partial, out, dtype_name)
        info = {
            "run": str(run.root),
            "kind": "unmerged",
            "base_model": recipe.model.name_or_path,
            "base_source": recorded_source(run),
            "dtype": dtype_name,
            "quantization": recipe.quantization.model_dump(),
            **written,
            "seconds": round(time.time() - started, 2),
        }
        write_json_atomic(partial / EXPORT_INFO, info)
        fidelity = _verify(recipe, run, partial, dtype_name, rows) if verify else None
        if gguf_type is not None:
            from qlora_pipe.export.lora_gguf import export_unmerged_gguf, unmerged_gguf_table

            result = export_unmerged_gguf(run, partial, gguf_type)
            fidelity = {**(fidelity or {}), "gguf": result}
            write_json_atomic(partial / FIDELITY, fidelity)
            print(unmerged_gguf_table(result))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # ours: nothing half-written is left behind
        raise
    (partial / PARTIAL_MARKER).unlink()
    if out.is_dir():
        shutil.rmtree(out)  # an earlier export (export_info.json) or an empty folder: checked before any work
    partial.rename(out)
    print(f"unmerged export: {out / 'base'} + {out / 'adapter'}")
    return ExportResult(out, info, fidelity)


def _write_pair(recipe: Recipe, run: RunDir, base: Path, partial: Path, out: Path, dtype_name: str) -> dict[str, Any]:
    """base/ (dequantized, no delta) and adapter/ (the run's adapter naming base/ as its base)."""
    from qlora_pipe.models.loading import load_run_tokenizer

    max_bytes = parse_size(recipe.export.max_shard_size, "export.max_shard_size")
    written = merge_stream(recipe, run, base, partial / "base", "dequantized", DTYPES[dtype_name], max_bytes, False)
    tokenizer = load_run_tokenizer(run.root)
    tokenizer.save_pretrained(partial / "base")
    make_serving_files(partial / "base")
    write_configs(base, partial / "base", dtype_name, tokenizer, [], generation_defaults(recipe))
    (partial / "adapter").mkdir()
    shutil.copy(run.adapter_weights, partial / "adapter" / run.adapter_weights.name)
    config = json.loads(run.adapter_config.read_text())
    config["base_model_name_or_path"] = str((out / "base").resolve())  # where it will be once complete
    (partial / "adapter" / run.adapter_config.name).write_text(json.dumps(config, indent=2) + "\n")
    written.pop("delta_kept", None)
    written.pop("merged", None)
    return {**written, "delta_kept": "all: the adapter is served as trained, not rounded into the weights"}


def _verify(recipe: Recipe, run: RunDir, partial: Path, dtype_name: str, rows: Any) -> dict[str, Any]:
    from qlora_pipe.export.fidelity import fidelity_table, served_model, verify_served

    fidelity = verify_served(
        recipe, run, lambda: served_model(partial / "base", DTYPES[dtype_name], partial / "adapter"), rows=rows
    )
    fidelity["served_as"] = "base + PEFT adapter (transformers)"
    write_json_atomic(partial / FIDELITY, fidelity)
    print(fidelity_table(fidelity))
    if not fidelity["passed"]:
        raise UserError("export --unmerged: base + adapter do not reproduce the trained model (numbers above)")
    return fidelity
