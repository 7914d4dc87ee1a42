"""`qlora-pipe export`: a finished run -> a deployable merged model directory, verified."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_pipe.errors import UserError
from qlora_pipe.export.disk import disk_refusal
from qlora_pipe.export.merge import base_checkpoint_dir, merge_stream
from qlora_pipe.export.reuse import record_merged, reusable_export
from qlora_pipe.export.serving import make_serving_files
from qlora_pipe.export.streamed_model import STREAMED
from qlora_pipe.machine import host_memory
from qlora_pipe.machine.host_memory import HostMemory
from qlora_pipe.methods import method_for
from qlora_pipe.models.base_record import recorded_source, run_recipe
from qlora_pipe.models.loading import DTYPES
from qlora_pipe.runs import (
    EXPORT_INFO,
    RunDir,
    resolve_run,
    training_system_prompt,
    write_json_atomic,
)
from qlora_pipe.sizes import parse_size

log = logging.getLogger(__name__)

FIDELITY = "fidelity.json"


@dataclass
class ExportResult:
    out: Path
    info: dict[str, Any]
    fidelity: dict[str, Any] | None


def generation_defaults(recipe) -> dict:
    """The recipe's generation section as generation_config.json keys, so serving decodes as chat does."""
    g = recipe.generation
    out = {"max_new_tokens": g.max_new_tokens, "do_sample": g.do_sample}
    if g.do_sample:  # sampling parameters with greedy decoding only earn "ignored" warnings
        out.update(temperature=g.temperature, top_p=g.top_p)
    else:
        out.update(temperature=None, top_p=None, top_k=None)
    return out


def write_configs(
    base: Path, folder: Path, dtype_name: str, tokenizer, untied: list[str], sampling: dict | None = None
) -> None:
    """config.json in the export dtype without quantization; generation config stopping at end of turn."""
    config = json.loads((base / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype"] = dtype_name
    config["dtype"] = dtype_name
    if untied:
        config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    generation_path = base / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = [e for e in ([eos] if isinstance(eos, int) else list(eos or [])) if e is not None]
    if tokenizer.eos_token_id not in eos_ids:  # the end-of-turn token the model was trained to emit
        eos_ids.insert(0, tokenizer.eos_token_id)
    generation["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    generation["pad_token_id"] = tokenizer.pad_token_id
    generation.setdefault("bos_token_id", config.get("bos_token_id"))
    for key, value in (sampling or {}).items():  # None: drop the base's value (greedy needs no temperature)
        if value is None:
            generation.pop(key, None)
        else:
            generation[key] = value
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def require_delta_kept(fidelity: dict[str, Any], kept: dict[str, Any] | None, merge_base: str) -> None:
    """A merge into the weights the adapter was trained against must carry (nearly) all of its delta."""
    from qlora_pipe.export.delta_kept import MIN_MEAN_KEPT

    fidelity["delta_kept"] = kept
    if kept is None or merge_base != "dequantized":
        return
    fidelity["criteria"]["min_mean_delta_kept"] = MIN_MEAN_KEPT
    fidelity["passed"] = fidelity["passed"] and kept["mean"] >= MIN_MEAN_KEPT


def _original_fidelity(recipe, run, base: Path, partial: Path, dtype_name: str, max_bytes: int, streamed) -> dict:
    """The same verification for a merge into the original 16-bit weights (written aside, then removed)."""
    from qlora_pipe.export.fidelity import verify_merged

    aside = partial.with_name(partial.name + ".original")
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    try:
        merge_stream(recipe, run, base, aside, "original", DTYPES[dtype_name], max_bytes)
        shutil.copy(partial / "config.json", aside / "config.json")
        return verify_merged(recipe, run, aside, DTYPES[dtype_name], streamed=streamed)
    finally:
        shutil.rmtree(aside, ignore_errors=True)


PARTIAL_MARKER = ".qlora-pipe-export"


def check_export_target(out: Path, partial: Path) -> None:
    """The export replaces only what it can prove it wrote: an earlier merged folder (export_info.json),
    an empty folder, or its own unfinished ``.partial`` folder. Anything else is the user's and refused."""
    if out.exists() and not out.is_dir():
        raise UserError(f"export --out {out}: a file is in the way; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_INFO).is_file():
        raise UserError(
            f"export --out {out}: the folder holds files that are not a merged model qlora-pipe wrote "
            f"(no {EXPORT_INFO}); choose a new or empty folder"
        )
    # Ours: the marker of an export in progress, or export_info.json, written before the marker goes
    # (a verified export killed between removing the marker and taking the final name).
    if partial.exists() and not any((partial / name).is_file() for name in (PARTIAL_MARKER, EXPORT_INFO)):
        raise UserError(f"export: {partial} is in the way and was not written by qlora-pipe; move it or choose --out")


def export_merged(
    run_dir: str | Path | None = None,
    out: str | Path | None = None,
    merge_base: str | None = None,
    dtype: str | None = None,
    max_shard_size: str | None = None,
    verify: bool | None = None,
    compare_original: bool = False,
    gguf_types: list[str] | None = None,
) -> ExportResult:
    """Merge a finished run's adapter into its base and write (and by default verify) the result; then the
    GGUF files asked for (``gguf_types``: explicit, errors are errors; else the recipe's export.gguf, skipped
    with a notice when the gguf extra or the converter is missing). One export of a run at a time."""
    run = resolve_run(run_dir)
    with run.exporting(), HostMemory():
        return _export_run(run, out, merge_base, dtype, max_shard_size, verify, compare_original, gguf_types)


def _export_run(
    run: RunDir,
    out: str | Path | None,
    merge_base: str | None,
    dtype: str | None,
    max_shard_size: str | None,
    verify: bool | None,
    compare_original: bool,
    gguf_types: list[str] | None,
) -> ExportResult:
    from qlora_pipe.models.loading import load_run_tokenizer

    started = time.time()
    recipe = run_recipe(run, "export")  # its base checked: the one the run trained on
    settings = recipe.export
    merge_base = merge_base or settings.merge_base
    dtype_name = dtype or settings.dtype
    verify = settings.verify if verify is None else verify
    max_bytes = parse_size(
        max_shard_size or settings.max_shard_size, "--max-shard-size" if max_shard_size else "export.max_shard_size"
    )
    out = Path(out) if out else run.root / "merged"
    if gguf_types and out.resolve() != (run.root / "merged").resolve():
        raise UserError("export --format gguf: converts the run's own merged folder (RUN/merged); leave out --out")
    if gguf_types and (refusal := method_for(recipe).refusal("export --format gguf", run)):
        raise UserError(refusal)
    base = base_checkpoint_dir(recipe)
    wanted = gguf_types if gguf_types is not None else settings.gguf
    if wanted and out.resolve() == (run.root / "merged").resolve():
        reused = reusable_export(run, out, merge_base, dtype_name, verify)
        if reused is not None:
            _export_ggufs(run, out, gguf_types, settings.gguf)
            return ExportResult(out, *reused)

    partial = out.with_name(out.name + ".partial")
    check_export_target(out, partial)
    if verify:  # before anything is written: refused with the numbers when it cannot fit
        from qlora_pipe.export.verify_memory import preflight_verification

        verify_memory = preflight_verification(recipe, run, base, dtype_name)
        from qlora_pipe.export.fidelity import verification_rows

        rows = verification_rows(recipe, run)  # the data read before the merge: a problem refuses it
    shutil.rmtree(partial, ignore_errors=True)  # ours (checked): a failed earlier export
    partial.mkdir(parents=True)
    (partial / PARTIAL_MARKER).write_text("an export in progress, or one that failed its checks\n")
    try:
        merged = merge_stream(recipe, run, base, partial, merge_base, DTYPES[dtype_name], max_bytes)
        tokenizer = load_run_tokenizer(run.root)
        tokenizer.save_pretrained(partial)
        make_serving_files(partial)  # no {% generation %} markers; loadable by the transformers engines pin
        write_configs(base, partial, dtype_name, tokenizer, merged["untied"], generation_defaults(recipe))
        method_for(recipe).write_export_config(partial, recipe, tokenizer)
        info = {
            "run": str(run.root),
            "base_model": recipe.model.name_or_path,
            "base_source": recorded_source(run),
            "merge_base": merge_base,
            "dtype": dtype_name,
            "quantization": recipe.quantization.model_dump(),
            **merged,
            "seconds": round(time.time() - started, 2),
        }
        write_json_atomic(partial / EXPORT_INFO, info)
    except BaseException as exc:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written is left behind
        refusal = disk_refusal(exc, partial)
        if refusal is None:
            raise
        raise refusal from exc
    fidelity = None
    if verify:
        from qlora_pipe.export.fidelity import fidelity_table, verify_merged

        verify_started = time.time()
        try:
            streamed = verify_memory["merged_loaded"] == STREAMED
            fidelity = verify_merged(recipe, run, partial, DTYPES[dtype_name], rows=rows, streamed=streamed)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)  # not verified, no verdict to look at: nothing left
            raise
        fidelity["merge_base"] = merge_base
        require_delta_kept(fidelity, merged["delta_kept"], merge_base)
        fidelity["memory"] = verify_memory
        fidelity["seconds"] = round(time.time() - verify_started, 1)
        if (memory := host_memory.current()) is not None:  # the export's peak so far (merge and verification),
            fidelity["host_memory"] = memory.report()  # kept in fidelity.json whether it passed or not
        if compare_original and merge_base == "dequantized":
            fidelity["original_merge_base"] = _original_fidelity(
                recipe, run, base, partial, dtype_name, max_bytes, streamed
            )
        write_json_atomic(partial / FIDELITY, fidelity)
        print(fidelity_table(fidelity))
        if "original_merge_base" in fidelity:
            print("for comparison, merged into the original 16-bit weights:")
            print(fidelity_table(fidelity["original_merge_base"]))
        if not fidelity["passed"] and merge_base == "original":
            # The user asked for the 16-bit weights the adapter was not trained against: report, don't refuse.
            log.warning("merge base 'original' differs from the trained model by the numbers above (expected)")
        elif not fidelity["passed"]:
            overflow = dtype_name == "float16" and (
                "float16_overflow" in fidelity or not math.isfinite(fidelity["eval_loss_merged"])
            )
            raise UserError(
                (
                    "export --dtype float16: the merged model's activations overflow float16 (NaN or infinite logits "
                    "on held-out rows; its weights fit); export bfloat16 or float32. "
                    if overflow
                    else "export: the merged model does not reproduce the trained model. "
                )
                + f"See {partial / FIDELITY}; it was left in that .partial folder"
            )
    (partial / PARTIAL_MARKER).unlink()
    if out.is_dir():
        shutil.rmtree(out)  # an earlier export (export_info.json) or an empty folder: checked before any work
    partial.rename(out)  # only a complete (and, by default, verified) export gets the final name
    info = record_merged(run, out, info)  # each file's hash, so that a GGUF export can reuse the folder
    if recipe.training.preview_prompts:
        from qlora_pipe.export.merged_answers import print_merged_answers

        print_merged_answers(out, recipe, dtype_name, training_system_prompt(run), info["bytes"])
    if out.resolve() == (run.root / "merged").resolve():  # a GGUF is made from the run's own merged folder
        _export_ggufs(run, out, gguf_types, settings.gguf)
    return ExportResult(out, info, fidelity)


def _export_ggufs(run: RunDir, out: Path, gguf_types: list[str] | None, recipe_types: list[str]) -> None:
    from qlora_pipe.export.gguf_command import export_gguf, gguf_table

    for gguf_type in gguf_types if gguf_types is not None else wanted_gguf(recipe_types):
        print(gguf_table(export_gguf(run, out, gguf_type)))


def wanted_gguf(types: list[str]) -> list[str]:
    """The recipe's export.gguf types this machine can write; a notice for the others (not an error)."""
    from qlora_pipe.export.gguf import check_gguf_type

    ready = []
    for gguf_type in types:
        try:
            check_gguf_type(gguf_type)
            ready.append(gguf_type)
        except UserError as exc:
            log.warning("export.gguf %s: not written: %s", gguf_type, exc)
    return ready
