"""Cache of tokenized datasets, keyed by a fingerprint of everything that shapes them.

The key covers the data files' contents, the data section of the recipe, the seed, the
tokenizer (vocabulary, special tokens) and the chat template. A Hub source without a pinned
revision can change under the same name, so such data is never cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from qlora_pipe.data.prepared import PreparedData
from qlora_pipe.data.sources import resolve_files
from qlora_pipe.recipe import DataSection
from qlora_pipe.runs import file_sha256

log = logging.getLogger(__name__)

CACHE_FORMAT = 4  # bump when the tokenized layout or the masking rules change


def data_fingerprint(data: DataSection, tokenizer, seed: int) -> str | None:
    """A stable key for this data + tokenizer + template, or None when the input is not pinned."""
    parts: dict = {
        "format": CACHE_FORMAT,
        "data": data.model_dump(mode="json", exclude={"cache_dir", "num_proc"}),
        "seed": seed,
        "tokenizer": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
        if hasattr(tokenizer, "backend_tokenizer")
        else repr(sorted(tokenizer.get_vocab().items())),
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "template": tokenizer.chat_template,
        "files": {},
    }
    for source in data.train_sources() + data.held_out_sources():
        if source.hub is not None:
            if source.revision is None:
                return None
            continue
        for path in resolve_files(source.path):
            parts["files"][str(path)] = file_sha256(path)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cache_path(data: DataSection, fingerprint: str) -> Path:
    return Path(data.cache_dir).expanduser() / fingerprint


def load_cached(data: DataSection, fingerprint: str | None) -> PreparedData | None:
    from datasets import load_from_disk

    from qlora_pipe.data.report import SplitReport

    if fingerprint is None:
        return None
    root = cache_path(data, fingerprint)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        train = load_from_disk(str(root / "train"))
        eval_ds = load_from_disk(str(root / "eval")) if (root / "eval").is_dir() else None
    except (OSError, ValueError, KeyError) as exc:
        log.warning("data cache at %s is unreadable (%s); rebuilding", root, exc)
        return None
    reports = [SplitReport.from_dict(r) for r in meta["reports"]]
    reports[0].marks = meta.get("preview_marks", [])
    log.info("data: reusing tokenized data from cache %s", root)
    return PreparedData(train, eval_ds, reports, meta["system_prompt"], fingerprint, cache_hit=True)


def save_cached(data: DataSection, prepared: PreparedData) -> None:
    """Write train/eval/meta to a temporary folder, then rename: a half-written cache is never read."""
    if prepared.fingerprint is None:
        return
    root = cache_path(data, prepared.fingerprint)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        prepared.train.save_to_disk(str(tmp / "train"))
        if prepared.eval is not None:
            prepared.eval.save_to_disk(str(tmp / "eval"))
        meta = {
            "reports": [r.as_dict() for r in prepared.reports],
            "system_prompt": prepared.system_prompt,
            "preview_marks": prepared.reports[0].marks,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    except OSError as exc:  # a cache that cannot be written costs time, never correctness
        log.warning("could not write the data cache at %s: %s", root, exc)
        shutil.rmtree(tmp, ignore_errors=True)
