"""The export's last word: a few answers from the merged model, loaded the way a user would."""

from __future__ import annotations

import logging
from pathlib import Path

from qlora_pipe.machine.hardware import dtype_for_inference
from qlora_pipe.models.loading import DTYPES

log = logging.getLogger(__name__)


def print_merged_answers(out: Path, recipe, dtype_name: str, system: str | None, stored_bytes: int) -> None:
    """Answers to the recipe's preview prompts from plain transformers; skipped, with the numbers, when the
    merged model in the dtype it runs in here (``stored_bytes`` as written) does not fit whole: generating
    with its blocks read from disk for every token would take hours at 7B."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_pipe.export.verify_memory import HEADROOM, GiB, available_memory
    from qlora_pipe.models.generation import generate_answers
    from qlora_pipe.models.loading import training_device

    runs_in = DTYPES[dtype_for_inference(dtype_name)]
    need = stored_bytes * runs_in.itemsize // DTYPES[dtype_name].itemsize * HEADROOM
    available, source = available_memory(str(training_device()))
    if need > available:
        log.warning(
            "answers from the merged model skipped: loading it whole in %s needs about %.2f GiB, %.2f GiB available "
            "(%s); `qlora-pipe chat` on a larger machine, or its GGUF with llama.cpp, answers",
            str(runs_in).removeprefix("torch."),
            need / GiB,
            available / GiB,
            source,
        )
        return
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=runs_in)
    prompts = recipe.training.preview_prompts
    answers = generate_answers(model, tokenizer, prompts, system, recipe.training.preview_max_new_tokens)
    print(f"\n=== answers from the merged model ({out}, plain transformers) ===")
    for prompt, answer in zip(prompts, answers, strict=True):
        print(f"\nQ: {prompt}\n  A: {answer!r}")
    print()
