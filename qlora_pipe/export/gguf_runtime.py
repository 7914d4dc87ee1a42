"""llama.cpp itself beside the trained model (when llama-cpp-python is installed): the GGUF as served.

On the run's eval rows: llama.cpp's tokens for the rendered text against the tokenizer's, its logits
against the trained model's (4-bit base + adapter) with the same measures as the merged-model check,
and greedy answers to the eval questions, token for token.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from qlora_pipe.runs import RunDir, training_system_prompt

ROWS = 16  # the merged-model check uses the same 16 eval rows
ANSWERS = 4
ANSWER_TOKENS = 24


class LlamaCppLogits:
    """A llama.cpp model with the call the fidelity check makes on a transformers model."""

    def __init__(self, llm) -> None:
        self.llm = llm

    def parameters(self):
        yield torch.zeros(1)  # the check puts its inputs on the model's device: the CPU

    def __call__(self, input_ids: torch.Tensor):
        ids = input_ids[0].tolist()
        self.llm.reset()
        self.llm.eval(ids)
        scores = np.array(self.llm.scores[: len(ids)], dtype=np.float32, copy=True)
        return SimpleNamespace(logits=torch.from_numpy(scores)[None])

    def greedy(self, prompt: list[int], stops: list[int], limit: int) -> list[int]:
        out: list[int] = []
        for token in self.llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            if token in stops or len(out) >= limit:
                break
            out.append(token)
        return out


def compare_runtime(run: RunDir, gguf_file: Path, lora: Path | None = None) -> dict[str, Any]:
    """In its own process: a crash inside llama.cpp is reported, not fatal to the export. ``lora``: a LoRA
    GGUF that llama.cpp applies on ``gguf_file`` (the unmerged export)."""
    out = gguf_file.with_name(gguf_file.name + ".runtime.json")
    command = [sys.executable, "-m", "qlora_pipe.export.gguf_runtime", str(run.root), str(gguf_file), str(out)]
    command += [str(lora)] if lora else []
    done = subprocess.run(command, capture_output=True, text=True)
    try:
        if done.returncode == 0:
            return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)
    if done.returncode < 0:
        return {"failed": f"llama.cpp crashed ({signal.Signals(-done.returncode).name}) running this file"}
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith(" ")]
    return {"failed": f"the llama.cpp check stopped (exit {done.returncode}): {(lines or [''])[-1][:300]}"}


def measure(run: RunDir, gguf_file: Path, lora: Path | None = None) -> dict[str, Any]:
    from llama_cpp import Llama

    from qlora_pipe.export.fidelity import compare, fidelity_rows, reference_noise
    from qlora_pipe.export.verdict import judge
    from qlora_pipe.machine.cpu_threads import choose_cpu_threads
    from qlora_pipe.methods import method_for
    from qlora_pipe.models.base_record import run_recipe
    from qlora_pipe.models.generation import chat_prompt_ids, stop_token_ids
    from qlora_pipe.models.loading import load_run_tokenizer

    recipe = run_recipe(run, "export --format gguf")
    tokenizer = load_run_tokenizer(run.root)
    rows, _ = fidelity_rows(recipe, tokenizer, ROWS, run)
    threads = choose_cpu_threads().threads  # QLORA_PIPE_CPU_THREADS, OMP_NUM_THREADS or the CPUs available
    longest = max(len(row["input_ids"]) for row in rows)
    extra = {"lora_path": str(lora)} if lora else {}
    llm = Llama(
        model_path=str(gguf_file),
        n_ctx=max(longest, 512) + 64,
        logits_all=True,
        verbose=False,
        n_threads=threads,
        **extra,
    )
    served = LlamaCppLogits(llm)
    texts = [tokenizer.decode(row["input_ids"]) for row in rows]
    same_tokens = sum(
        llm.tokenize(text.encode(), add_bos=False, special=True)
        == tokenizer(text, add_special_tokens=False)["input_ids"]
        for text in texts
    )
    trained = method_for(recipe).load_trained(recipe, run.root)
    # judged as the merged export is: bounds widened by the trained model's own precision noise on these rows
    result = judge(compare(trained, served, rows), reference_noise(recipe, run, trained, rows))
    result["eval_loss_llama_cpp"] = result.pop("eval_loss_merged")
    result["tokenization_identical"] = f"{same_tokens}/{len(texts)}"
    system = training_system_prompt(run)
    prefix = [{"role": "system", "content": system}] if system else []
    questions = recipe.training.preview_prompts[:ANSWERS]  # the questions the run answered before and after
    stops = stop_token_ids(tokenizer)
    identical = 0
    for question in questions:
        prompt = chat_prompt_ids(tokenizer, [*prefix, {"role": "user", "content": question}])
        ids = torch.tensor([prompt])
        with torch.no_grad():
            output = trained.generate(
                input_ids=ids, max_new_tokens=ANSWER_TOKENS, do_sample=False, eos_token_id=stops, pad_token_id=stops[0]
            )[0, len(prompt) :].tolist()
        expected = next((output[:i] for i, t in enumerate(output) if t in stops), output)
        identical += served.greedy(prompt, stops, ANSWER_TOKENS) == expected
    result["greedy_identical"] = f"{identical}/{len(questions)}"
    del trained, llm
    return result


if __name__ == "__main__":
    lora_file = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    result = measure(RunDir(Path(sys.argv[1])), Path(sys.argv[2]), lora_file)
    Path(sys.argv[3]).write_text(json.dumps(result, indent=2, default=str))
