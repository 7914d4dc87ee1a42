"""The base model a run trained on: recorded when training starts (``base.json``), checked by every stage after.

Export, eval, chat, push and resume load the base again by its name. A file replaced since, under the same
name (even with its size and modification time kept), would hand them weights the adapter never learned on,
and an export's verification would rebuild the "trained" model from those same weights and pass. So `train`
records what the base was: a GGUF file by its sha256, a local folder by its config, weights index and weight
files (size and sha256 each), a Hub id by the commit it resolved to. The later stages compare before loading
anything and refuse, in one line, a local base that no longer matches; a Hub base is loaded at its recorded
commit. Each hash is read once per file version (user_cache.sha256_of), so a check costs a stat per file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from qlora_pipe.errors import UserError
from qlora_pipe.machine.user_cache import sha256_of
from qlora_pipe.models.gguf_source import gguf_file_of, gguf_source
from qlora_pipe.recipe import Recipe, load_recipe
from qlora_pipe.recipe.model_source import local_path
from qlora_pipe.runs import RunDir, write_json_atomic

WATCHED = ("config.json", "model.safetensors.index.json")  # besides every *.safetensors of the folder
COMMIT = re.compile(r"[0-9a-f]{40}")


def describe_base(recipe: Recipe, full: bool = True) -> dict[str, Any]:
    """The base as it is now. ``full``: a GGUF's facts too (architecture, quantization), as runs record them."""
    name = recipe.model.name_or_path
    gguf = gguf_file_of(name)
    if gguf is not None:
        source = gguf_source(gguf) if full else {"gguf": str(gguf.resolve()), "sha256": sha256_of(gguf)}
        return {"name_or_path": name, "gguf": source}
    folder = local_path(name)
    if folder is not None:
        if not folder.is_dir():
            raise UserError(f"base model not found: {name}")
        return {"name_or_path": name, "folder": str(folder.resolve()), "files": folder_files(folder)}
    commit = hub_commit(name, recipe.model.revision)
    return {"name_or_path": name, "hub": name, "revision": recipe.model.revision, "commit": commit}


def folder_files(folder: Path) -> dict[str, dict[str, Any]]:
    files = [folder / name for name in WATCHED if (folder / name).is_file()] + sorted(folder.glob("*.safetensors"))
    return {file.name: {"bytes": file.stat().st_size, "sha256": sha256_of(file)} for file in files}


def hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a Hub revision resolves to in the local Hub cache (what loading used), or None if unknown."""
    if revision and COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return Path(found).parent.name if isinstance(found, str) else None


def record_base(run: RunDir, recipe: Recipe) -> dict[str, Any]:
    record = describe_base(recipe)
    write_json_atomic(run.base_record, record)
    return record


def recorded_base(run: RunDir) -> dict[str, Any] | None:
    """base.json; for a run from before it, the GGUF its summary names; None when nothing was recorded."""
    if run.base_record.is_file():
        return json.loads(run.base_record.read_text())
    summary = json.loads(run.summary.read_text()) if run.summary.is_file() else {}
    source = summary.get("base_source")
    return {"name_or_path": summary.get("base_model"), "gguf": source} if source else None


def recorded_source(run: RunDir) -> dict[str, Any] | None:
    """The GGUF the run's base came from (file, sha256, quantization), or None for any other base."""
    record = recorded_base(run)
    return record.get("gguf") if record else None


def base_change(recorded: dict[str, Any], now: dict[str, Any]) -> str | None:
    """How the base now differs from the recorded one, in words; None when it is the same."""
    kinds = ("gguf", "folder", "hub")
    was, is_now = (next(k for k in kinds if k in d) for d in (recorded, now))
    if was != is_now:
        return f"{recorded['name_or_path']} was a {was} base when the run trained on it and is now a {is_now} base"
    if was == "gguf":
        old, new = recorded["gguf"]["sha256"], now["gguf"]["sha256"]
        if old != new:
            return f"the GGUF file {now['gguf']['gguf']} had sha256 {old[:16]}... and now has {new[:16]}..."
    elif was == "folder":
        return _folder_change(now["folder"], recorded["files"], now["files"])
    elif recorded.get("commit") and now.get("commit") and recorded["commit"] != now["commit"]:
        revision = now["revision"] or "main"
        return f"{now['hub']} at {revision} is now commit {now['commit'][:12]}, not {recorded['commit'][:12]}"
    return None


def _folder_change(folder: str, old: dict[str, dict], new: dict[str, dict]) -> str | None:
    for name in sorted(set(old) | set(new)):
        if name not in new:
            return f"{folder}/{name} is gone"
        if name not in old:
            return f"{folder}/{name} is new"
        before, after = old[name], new[name]
        if before["sha256"] != after["sha256"]:
            sizes = f"{before['bytes']:,} -> {after['bytes']:,} bytes, " if before["bytes"] != after["bytes"] else ""
            hashes = f"sha256 {before['sha256'][:16]}... -> {after['sha256'][:16]}..."
            return f"{folder}/{name} changed ({sizes}{hashes})"
    return None


def check_same_base(run: RunDir, recipe: Recipe, doing: str) -> None:
    """Refuse, in one line, a base that is not the one ``run`` trained on (runs that recorded none pass)."""
    recorded = recorded_base(run)
    if recorded is None:
        return
    change = base_change(recorded, describe_base(recipe, full=False))
    if change:
        raise UserError(
            f"{doing} {run.root}: the base model changed since the run trained on it: {change}; restore the "
            "base it was trained on, or train a new run on this one"
        )


def settled_values(recipe: Recipe) -> dict[str, object]:
    """The settings training resolves once for this machine and records in the run's recipe (the micro batch
    auto chooses is recorded apart, in auto_batch.json)."""
    return {
        "training.precision": recipe.training.precision,
        "quantization.compute_dtype": recipe.quantization.compute_dtype,
        "data.max_length": recipe.data.max_length,
    }


def run_recipe(run: RunDir, doing: str) -> Recipe:
    """The recipe a finished run trained with, its base checked against the recorded one (a Hub base pinned to
    the commit it trained on): what export, eval, chat and push start from."""
    recipe = load_recipe(run.resolved_recipe)
    unsettled = [key for key, value in settled_values(recipe).items() if value == "auto"]
    if unsettled:
        raise UserError(
            f"{doing}: {run.resolved_recipe} leaves {', '.join(unsettled)} at auto; training settles them once and "
            "every later stage reads them (this file was not written by qlora-pipe train)"
        )
    recorded = recorded_base(run) or {}
    commit = recorded.get("commit")
    if commit and recipe.model.revision != commit:
        recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"revision": commit})})
    check_same_base(run, recipe, doing)
    return recipe
