"""Generation helpers shared by `chat` and `eval`: stop tokens, settings, batched greedy decoding."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class Generation:
    text: str
    new_tokens: int  # generated tokens, the stop token included
    stopped: bool  # ended at a stop token (end of turn) rather than at max_new_tokens


@dataclass
class GenerationSettings:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None

    def generate_kwargs(self, stops: list[int], pad_token_id: int | None) -> dict:
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "eos_token_id": stops,
            "pad_token_id": pad_token_id,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:  # a sampling temperature from generation_config.json would only trigger "ignored" warnings
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def describe(self) -> str:
        mode = "greedy" if not self.do_sample else f"sampling (temperature {self.temperature}, top-p {self.top_p})"
        return f"{mode}, at most {self.max_new_tokens} new tokens"


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """The tokenizer's EOS (the end-of-turn token training taught the model to emit) first, then the model's own."""
    stops = [tokenizer.eos_token_id]
    eos = getattr(generation_config, "eos_token_id", None)
    for token in [eos] if isinstance(eos, int) else list(eos or []):
        if token is not None and token not in stops:
            stops.append(token)
    return stops


def chat_prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The conversation rendered with the model's chat template (and its tools, if any), ending with the
    assistant's turn header."""
    extra = {"tools": tools} if tools else {}
    try:
        rendered = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, **extra
        )
    except Exception as exc:  # a bug in the template (the data stage dropped the rows it failed on)
        from qlora_pipe.data.template_errors import template_failure
        from qlora_pipe.errors import UserError

        failure = template_failure(exc)
        if failure is None:
            raise
        raise UserError(
            f"the chat template cannot render the prompt {messages[-1]['content']!r:.80}: {failure}"
        ) from exc
    return list(rendered["input_ids"])


def to_generation(tokenizer, new_ids: list[int], stops: list[int]) -> Generation:
    """Cut at the first stop token (batch-mates that stopped earlier are padded after it) and decode."""
    end = next((i for i, token in enumerate(new_ids) if token in stops), None)
    kept = new_ids if end is None else new_ids[:end]
    text = tokenizer.decode(kept, skip_special_tokens=True).strip()
    return Generation(text, len(new_ids) if end is None else end + 1, end is not None)


@contextmanager
def left_padding(tokenizer) -> Iterator[None]:
    """Pad on the left while generating, so every row's last prompt token is where generation continues."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def generate_greedy(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8, desc: str | None = None
) -> list[Generation]:
    """Greedy answers to tokenized prompts, in batches of similar length, in the order given."""
    from qlora_pipe.terminal import progress_bar

    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    kwargs = GenerationSettings(max_new_tokens).generate_kwargs(stops, tokenizer.pad_token_id)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # less padding per batch
    results: list[Generation | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        bar = progress_bar(total=len(prompts), desc=desc or "answers", unit="answer", leave=False)
        with left_padding(tokenizer), bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = tokenizer.pad({"input_ids": [prompts[i] for i in chunk]}, return_tensors="pt")
                batch = batch.to(model.device)
                output = model.generate(**batch, **kwargs)
                for i, row in zip(chunk, output[:, batch["input_ids"].shape[1] :].tolist(), strict=True):
                    results[i] = to_generation(tokenizer, row, stops)
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def generate_answers(model, tokenizer, prompts: list[str], system: str | None, max_new_tokens: int) -> list[str]:
    """Preview answers: each question in the chat template, greedy, stopping at the end-of-turn token.
    One prompt per batch, so no answer depends on the padding of another."""
    prefix = [{"role": "system", "content": system}] if system else []
    ids = [chat_prompt_ids(tokenizer, [*prefix, {"role": "user", "content": p}]) for p in prompts]
    return [answer.text for answer in generate_greedy(model, tokenizer, ids, max_new_tokens, batch_size=1)]
