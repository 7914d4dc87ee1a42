"""Publishing: the adapter and/or the merged model to the Hugging Face Hub, with a model card.

Only the right files travel (weights, configs, tokenizer, card, loss curve): a staging folder is
assembled from an allow-list, so optimizer states, checkpoints, logs with local paths or tokens
never leave the machine. Never merges; the merged model is whatever `qlora-pipe export` wrote.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_pipe.errors import UserError
from qlora_pipe.export.serving import make_serving_files
from qlora_pipe.models.base_record import run_recipe
from qlora_pipe.publish.model_card import adapter_card, merged_card
from qlora_pipe.recipe import Recipe
from qlora_pipe.recipe.model_source import local_path
from qlora_pipe.runs import RunDir

log = logging.getLogger(__name__)

ADAPTER_FILES = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "loss.png",
)
MERGED_PATTERNS = (
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template.jinja",
    "fidelity.json",
)
LARGE_FOLDER_BYTES = 5 * 10**9


@dataclass
class PushPlan:
    what: str  # "adapter" or "merged"
    repo_id: str
    folder: Path  # staging folder, complete with README.md
    files: list[tuple[str, int]]


PLACEHOLDER_BASE = "<base model>"  # a local base directory that names no Hub id
TEXT_SUFFIXES = (".md", ".json", ".jinja", ".txt", ".yaml")


def public_base_name(recipe: Recipe) -> str:
    """How pushed files name the base: its Hub id, or for a local directory the Hub id it records
    (config.json ``_name_or_path``, its card's ``base_model``), else a placeholder; never the local path."""
    name = recipe.model.name_or_path
    path = local_path(name)
    if path is None:
        return name
    candidates = [_json_field(path / "config.json", "_name_or_path")]
    if (path / "README.md").is_file():
        from huggingface_hub import ModelCard

        base = ModelCard.load(path / "README.md").data.to_dict().get("base_model")
        candidates.append(base[0] if isinstance(base, list) and base else base)
    return next((c for c in candidates if isinstance(c, str) and "/" in c and local_path(c) is None), PLACEHOLDER_BASE)


def _json_field(path: Path, key: str) -> Any:
    try:
        return json.loads(path.read_text()).get(key) if path.is_file() else None
    except (OSError, ValueError):
        return None


def local_names(run: RunDir, recipe: Recipe) -> dict[str, str]:
    """Local paths that must not leave the machine, longest first, and what replaces each."""
    base = recipe.model.name_or_path
    public = public_base_name(recipe)
    found = {}
    if local_path(base) is not None:
        found |= {str(local_path(base).resolve()): public, base: public}
    found |= {str(run.root.resolve()): "<run directory>", str(run.root): "<run directory>"}
    return dict(sorted(found.items(), key=lambda kv: -len(kv[0])))


def scrub(staging: Path, names: dict[str, str]) -> None:
    """Replace local paths in every staged text file; the adapter config names the public base."""
    for path in staging.iterdir():
        if path.suffix not in TEXT_SUFFIXES:
            continue
        text = path.read_text(encoding="utf-8")
        for local, public in names.items():
            text = text.replace(local, public)
        path.write_text(text, encoding="utf-8")


def _stage(sources: list[Path], card: str, names: dict[str, str]) -> Path:
    staging = Path(tempfile.mkdtemp(prefix="qlora-pipe-push-"))
    for path in sources:
        shutil.copy2(path, staging / path.name)
    (staging / "README.md").write_text(card, encoding="utf-8")
    make_serving_files(staging)  # the pushed adapter carries the serving template (the run keeps its own)
    scrub(staging, names)
    return staging


def plan_push(run: RunDir, recipe: Recipe, repo_id: str, what: str) -> list[PushPlan]:
    """The folders and files that would be uploaded, one plan per repository."""
    plans = []
    if what in ("adapter", "both"):
        files = [run.root / name for name in ADAPTER_FILES if (run.root / name).is_file()]
        if not run.adapter_weights.is_file():
            raise UserError(f"{run.root}: no adapter to push (train first)")
        folder = _stage(files, adapter_card(run, recipe, repo_id), local_names(run, recipe))
        plans.append(PushPlan("adapter", repo_id, folder, _listing(folder)))
    if what in ("merged", "both"):
        merged = run.root / "merged"
        if not (merged / "config.json").is_file():
            raise UserError(f"{merged}: no merged model to push (run: qlora-pipe export {run.root})")
        files = sorted({p for pattern in MERGED_PATTERNS for p in merged.glob(pattern) if p.is_file()})
        files += [run.loss_curve] if run.loss_curve.is_file() else []
        # `both` puts the merged model in its own repository: a repo is either a PEFT adapter or a model.
        target = f"{repo_id}-merged" if what == "both" else repo_id
        folder = _stage(files, merged_card(run, recipe, target, merged), local_names(run, recipe))
        plans.append(PushPlan("merged", target, folder, _listing(folder)))
    return plans


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((p.name, p.stat().st_size) for p in folder.iterdir())


def hub_failure(exc: Exception, endpoint: str) -> str:
    """What actually went wrong talking to the Hub, in words a user can act on."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return "offline mode is on (HF_HUB_OFFLINE); unset it to push"
    if isinstance(exc, LocalTokenNotFoundError):
        return "no token found; set HF_TOKEN or run `hf auth login`"
    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        if status in (401, 403):
            return f"{endpoint} refused the token (HTTP {status}); set a valid HF_TOKEN or run `hf auth login`"
        return f"{endpoint} answered HTTP {status}: {' '.join(str(exc).split())[:200]}"
    return f"cannot reach {endpoint} ({type(exc).__name__}: {exc}); check the network, a proxy, or HF_ENDPOINT"


def preflight(api, repo_id: str) -> str:
    """Who am I, and may I write to this namespace? Fails before any upload."""
    try:
        me = api.whoami()
    except Exception as exc:  # huggingface_hub and its HTTP client raise several types; say which failure
        raise UserError(f"Hub: {hub_failure(exc, api.endpoint)}") from exc
    user = me.get("name", "?")
    namespace = repo_id.split("/")[0]
    role = me.get("auth", {}).get("accessToken", {}).get("role")
    orgs = {org.get("name") for org in me.get("orgs", [])}
    if role == "read":
        raise UserError(f"Hub: the token of {user} is read-only; create a token with write access")
    if namespace not in ({user} | orgs):
        raise UserError(f"Hub: {user} cannot write to the namespace {namespace!r}")
    return user


def push_run(
    run_dir: str | Path,
    repo_id: str,
    what: str = "adapter",
    private: bool = True,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
) -> list[PushPlan]:
    """Upload a run's adapter and/or merged model; on a dry run, only say what would go where."""
    run = RunDir(Path(run_dir))
    if not run.resolved_recipe.is_file():
        raise UserError(f"{run.root}: not a run directory (no {run.resolved_recipe.name})")
    if not run.is_finished():
        raise UserError(f"{run.root} is not a finished run (no summary.json); finish or resume training first")
    recipe = run_recipe(run, "push")
    plans = plan_push(run, recipe, repo_id, what)
    try:
        for plan in plans:
            size = sum(s for _, s in plan.files)
            print(f"{'would upload' if dry_run else 'uploading'} {plan.what} -> {plan.repo_id} ({size:,} bytes):")
            for name, nbytes in plan.files:
                print(f"  {name}  {nbytes:,}")
        if not dry_run:
            _upload(plans, private, revision, commit_message, run)
    finally:
        for plan in plans:
            shutil.rmtree(plan.folder, ignore_errors=True)
    return plans


def _upload(plans: list[PushPlan], private: bool, revision: str | None, message: str | None, run: RunDir) -> None:
    from huggingface_hub import HfApi

    api = HfApi()  # token: HF_TOKEN or the stored login; endpoint: HF_ENDPOINT
    for plan in plans:
        preflight(api, plan.repo_id)
    for plan in plans:
        retry = f"qlora-pipe push {run.root} --repo-id {plans[0].repo_id} --what {plan.what}"
        try:
            # huggingface_hub retries transient errors (5xx, 429, timeouts) itself, with backoff.
            api.create_repo(plan.repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(plan.repo_id, branch=revision, exist_ok=True)
            total = sum(size for _, size in plan.files)
            if total > LARGE_FOLDER_BYTES and not revision:
                # Many GB: huggingface_hub's resumable, multi-commit large-folder path.
                api.upload_large_folder(repo_id=plan.repo_id, folder_path=str(plan.folder), repo_type="model")
            else:
                api.upload_folder(
                    repo_id=plan.repo_id,
                    folder_path=str(plan.folder),
                    revision=revision,
                    commit_message=message or f"Upload {plan.what} trained with qlora-pipe",
                )
        except Exception as exc:
            raise UserError(
                f"Hub: pushing the {plan.what} to {plan.repo_id} failed ({type(exc).__name__}); local files are "
                f"untouched; to retry run: {retry}"
            ) from exc
        print(f"pushed {plan.what}: {api.endpoint}/{plan.repo_id}")


class CheckpointPusher:
    """Pushes each checkpoint's adapter as it is saved (hub.push_checkpoints). Checked before training
    starts; a failed checkpoint push is logged and training goes on (the files stay local)."""

    def __init__(self, repo_id: str, private: bool) -> None:
        from huggingface_hub import HfApi

        self.api, self.repo_id = HfApi(), repo_id
        preflight(self.api, repo_id)
        self.api.create_repo(repo_id, private=private, exist_ok=True)

    def push(self, checkpoint: Path, step: int) -> None:
        try:
            self.api.upload_folder(
                repo_id=self.repo_id,
                folder_path=str(checkpoint),
                allow_patterns=["adapter_model.safetensors", "adapter_config.json"],
                commit_message=f"Adapter at step {step} (qlora-pipe checkpoint)",
            )
            log.info("pushed the step-%d adapter to %s", step, self.repo_id)
        except Exception as exc:  # never lose a training run to a network hiccup
            log.warning("could not push checkpoint %s (%s); it stays local", checkpoint, type(exc).__name__)
