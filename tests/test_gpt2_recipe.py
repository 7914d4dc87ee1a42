"""recipes/gpt2-c_attn.yaml, the LoRA explainer's GPT-2 example (r 8, alpha 32, dropout 0.1, c_attn only),
run as shipped on a tiny GPT-2 built here: GPT-2's architecture (Conv1D layers), a GPT-2-like byte-level
tokenizer with only <|endoftext|> (no pad token, no chat template), trained, exported with verification,
reloaded by plain transformers and PEFT, and chatted with through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from qlora_pipe.recipe import validate_recipe
from tests.conftest import CORPUS, REPO

RECIPE = REPO / "recipes/gpt2-c_attn.yaml"


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    out = tmp_path_factory.mktemp("tiny-gpt2")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(), trainer)
    end = "<|endoftext|>"
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, bos_token=end, eos_token=end, unk_token=end)
    assert tokenizer.pad_token is None and not tokenizer.chat_template  # as GPT-2's own
    tokenizer.save_pretrained(out)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=128, n_layer=2, n_head=2, n_inner=256, n_positions=512,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(out)
    return out


def test_gpt2_recipe_trains_exports_and_chats_on_a_tiny_gpt2(tiny_gpt2, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_pipe.export.command import export_merged
    from qlora_pipe.training.stage import run_training

    raw = yaml.safe_load(RECIPE.read_text())
    assert raw["lora"] == {"r": 8, "alpha": 32, "dropout": 0.1, "target_modules": ["c_attn"]}  # the explainer's
    raw["model"]["name_or_path"] = str(tiny_gpt2)  # the one change: a local GPT-2 instead of the Hub's
    raw["output_dir"] = str(tmp_path / "runs")
    # A random 0.4M-parameter model needs a larger step than GPT-2; fewer rows and steps for the suite.
    raw["training"].update(max_steps=30, learning_rate=1e-2, eval_steps=30, save_steps=30, logging_steps=5)
    raw["data"].update(max_train_samples=96, max_eval_samples=16)
    result = run_training(validate_recipe(raw, "gpt2-c_attn.yaml"))
    summary = result.summary
    assert summary["final_eval_loss"] < summary["eval_loss_before"] - 0.2, summary
    adapter = json.loads(result.run_dir.adapter_config.read_text())
    assert adapter["target_modules"] == ["c_attn"]
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (8, 32, 0.1)
    saved = AutoTokenizer.from_pretrained(result.run_dir.root)
    assert saved.pad_token_id != saved.eos_token_id and saved.decode([saved.pad_token_id]) == "\x00"

    export = export_merged(result.run_dir.root)  # Conv1D weights merged in their (in, out) orientation
    assert export.fidelity["passed"] and export.info["merged"] == 2  # c_attn of both layers
    merged = AutoModelForCausalLM.from_pretrained(export.out)
    assert tuple(merged.transformer.h[0].attn.c_attn.weight.shape) == (128, 384)
    rendered = saved.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "### Instruction:\nHi\n\n### Response:\n"
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2), result.run_dir.root)
    assert peft_model.peft_config["default"].target_modules == {"c_attn"}

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    chat = subprocess.run(
        [sys.executable, "-m", "qlora_pipe.cli", "chat", str(export.out), "--prompt", "Rewrite: A lien is a claim.",
         "--max-new-tokens", "12", "--greedy"],
        capture_output=True, text=True, cwd=REPO, env=env,
    )  # fmt: skip
    assert chat.returncode == 0 and chat.stdout, chat.stderr[-2000:]  # a random tiny model: any answer
