"""A random-weight checkpoint of a real architecture, written as a sharded safetensors folder.

    python -m benchmarks random-model OUT [--config qwen2.5-7b-instruct] [--shard-size 2GB] [--tokenizer DIR]

The model's tensors are listed on PyTorch's meta device (names and shapes, no storage), split into shards of
at most --shard-size (a tensor larger than that gets a shard of its own), and each shard is generated and
written before the next one exists: the process never holds more than one shard. Matrices are drawn from a
normal of the config's initializer_range (0.02 where it has none) by a generator seeded from --seed and the
tensor's name, so the same seed gives the same bytes whatever the shard size; norm weights are 1 and biases 0;
all in bf16. Beside the shards: model.safetensors.index.json, config.json, generation_config.json and the
tokenizer's files (by default the Qwen2.5 1.5B's converted by `qlora-pipe get-model` and a first run: the
same vocabulary as the Qwen2.5 7B and 14B). Written into OUT.partial and renamed to OUT at the end; refused
in one line when the disk lacks the room. Prints its wall time and host memory peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_pipe.errors import UserError
from qlora_pipe.sizes import parse_size

COMMAND = "python -m benchmarks random-model"
DEFAULT_TOKENIZER = "qwen2.5-coder-1.5b-instruct-*"  # a converted folder under ~/.cache/qlora-pipe/gguf-bases
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
ROOM_SLACK = 16 * 2**20  # the small JSON files and the file system's own blocks
BF16 = 2  # bytes per weight


@dataclass
class Shard:
    file: str
    tensors: list[tuple[str, tuple[int, ...]]]
    size: int


def bundled_config(name: str) -> dict[str, Any]:
    """A bundled config by its short name (qwen2.5-7b-instruct), a Hub id, a config.json or a model folder."""
    from qlora_pipe.plan.shapes import BUNDLED, read_config

    for path in sorted(BUNDLED.glob("*.json")):
        if path.stem.split("__")[-1].lower() == name.lower():
            return json.loads(path.read_text(encoding="utf-8"))
    if "/" not in name and not Path(name).exists():
        known = ", ".join(sorted(p.stem.split("__")[-1].lower() for p in BUNDLED.glob("*.json")))
        raise UserError(f"--config: no bundled config {name!r}; choose one of {known}, or give a config.json")
    return read_config(name)


def tensor_shapes(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor save_pretrained would write, in the model's order: a tied weight once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--config: cannot build model_type {config.get('model_type')!r}: {exc}") from exc
    kept = {name for name, _ in model.named_parameters()}  # a tied weight under its first name only
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    state = model.state_dict()  # parameters and persistent buffers
    return [(name, tuple(t.shape)) for name, t in state.items() if name in kept or name not in every]


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], shard_size: int) -> list[Shard]:
    """Greedy, in order, as transformers' save_pretrained splits: a shard closes before it would overflow."""
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    sizes = [0]
    for name, shape in tensors:
        size = BF16 * _numel(shape)
        if groups[-1] and sizes[-1] + size > shard_size:
            groups.append([])
            sizes.append(0)
        groups[-1].append((name, shape))
        sizes[-1] += size
    count = len(groups)
    return [
        Shard(f"model-{i:05d}-of-{count:05d}.safetensors", group, size)
        for i, (group, size) in enumerate(zip(groups, sizes, strict=True), start=1)
    ]


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def make_tensor(name: str, shape: tuple[int, ...], seed: int, std: float):
    import torch

    if len(shape) == 1:  # norms multiply by 1, biases add 0: a plain, stable forward pass
        return torch.ones(shape, dtype=torch.bfloat16) if "norm" in name else torch.zeros(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=generator)


def tokenizer_folder(given: str | None) -> Path:
    if given is not None:
        folder = Path(given)
    else:
        from qlora_pipe.models.gguf_source import SOURCE_FILE, cache_root

        found = sorted(p for p in cache_root().glob(DEFAULT_TOKENIZER) if (p / SOURCE_FILE).is_file())
        if not found:
            raise UserError(
                f"--tokenizer: no converted {DEFAULT_TOKENIZER} under {cache_root()}; give a folder with "
                "tokenizer.json (e.g. after `qlora-pipe get-model qwen2.5-coder-1.5b-instruct` and a run on it)"
            )
        folder = found[-1]
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"--tokenizer: {folder} has no tokenizer.json")
    return folder


def check_vocabulary(folder: Path, config: dict[str, Any]) -> None:
    from tokenizers import Tokenizer

    tokens = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size", 0)
    if tokens > vocab:
        raise UserError(f"--tokenizer: {folder} has {tokens} tokens, more than the config's vocab_size {vocab}")


def check_room(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        raise UserError(
            f"{out.parent}: {needed / 1e9:.1f} GB needed for {out.name}, {free / 1e9:.1f} GB free; "
            "free some space or choose another folder"
        )


def write_folder(partial: Path, config: dict[str, Any], shards: list[Shard], tokenizer: Path, seed: int) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig

    std = float(config.get("initializer_range", 0.02))
    started = time.monotonic()
    for number, shard in enumerate(shards, start=1):
        tensors = {name: make_tensor(name, shape, seed, std) for name, shape in shard.tensors}
        save_file(tensors, str(partial / shard.file), metadata={"format": "pt"})
        del tensors  # the next shard is made only once this one is on disk
        print(f"{shard.file}: {shard.size / 1e9:.2f} GB ({number}/{len(shards)}, {time.monotonic() - started:.0f} s)")
    weight_map = {name: shard.file for shard in shards for name, _ in shard.tensors}
    index = {"metadata": {"total_size": sum(s.size for s in shards)}, "weight_map": weight_map}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    model_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    model_config.save_pretrained(partial)
    GenerationConfig.from_model_config(model_config).save_pretrained(partial)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copyfile(tokenizer / name, partial / name)


def random_model(out: Path, config_name: str, shard_size: int, tokenizer: str | None = None, seed: int = 0) -> Path:
    """Write the folder at ``out`` (which must not exist); returns it."""
    out = Path(out).absolute()
    partial = out.with_name(out.name + ".partial")
    for existing in (out, partial):
        if existing.exists():
            raise UserError(f"{existing} already exists; remove it or choose another folder")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent} is not a folder")
    config = bundled_config(config_name)
    source = tokenizer_folder(tokenizer)
    check_vocabulary(source, config)
    shards = plan_shards(tensor_shapes(config), shard_size)
    extra = sum((source / name).stat().st_size for name in TOKENIZER_FILES if (source / name).is_file())
    check_room(out, sum(s.size for s in shards) + extra + ROOM_SLACK)
    partial.mkdir()
    try:
        write_folder(partial, config, shards, source, seed)
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # made by this call (refused above if it existed)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the folder to write (must not exist)")
    parser.add_argument("--config", default="qwen2.5-7b-instruct", help="bundled name, Hub id or config.json")
    parser.add_argument("--shard-size", default="2GB", help="largest shard (default 2GB)")
    parser.add_argument("--tokenizer", help="folder with tokenizer.json (default: the converted Qwen2.5 1.5B)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from qlora_pipe.machine.host_memory import HostMemory

    started = time.monotonic()
    try:
        shard_size = parse_size(args.shard_size, "--shard-size")
        with HostMemory() as memory:
            out = random_model(Path(args.out), args.config, shard_size, args.tokenizer, args.seed)
    except UserError as exc:
        print(f"random-model: {exc}", file=sys.stderr)
        return 2
    print(f"{out}: written in {time.monotonic() - started:.0f} s; {memory.line()}")
    return 0
