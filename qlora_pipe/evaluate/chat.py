"""`qlora-pipe chat`: talk to a trained run (4-bit base + adapter) or a merged model, tokens streamed.

The model is prompted with the chat template it was trained with (saved with the run's tokenizer)
and stops at the end-of-turn token it was trained to emit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qlora_pipe.data.chat_masks import probe_template
from qlora_pipe.data.conversation import check_tools
from qlora_pipe.errors import UserError
from qlora_pipe.machine.hardware import load_dtype_for
from qlora_pipe.models.generation import (
    DEFAULT_MAX_NEW_TOKENS,
    GenerationSettings,
    chat_prompt_ids,
    stop_token_ids,
)
from qlora_pipe.rewards.tool_calls import parse_tool_calls
from qlora_pipe.runs import RESOLVED_RECIPE, STATUS, SUMMARY, resolve_run, run_of_merged, training_system_prompt

log = logging.getLogger(__name__)


@dataclass
class ChatModel:
    model: object
    tokenizer: object
    system: str | None  # the system prompt the run trained with, if known
    source: str  # what was loaded, for the banner
    defaults: object = None  # generation defaults: the recipe's generation section, or generation_config.json
    tools: list[dict] | None = None  # --tools: functions rendered into every prompt; calls are shown, not run
    processor: object = None  # a vision-language model's processor (its image processor and chat template)
    image: object = None  # --image: the picture shown with the first user message (PIL image)


def _is_run_dir(path: Path) -> bool:
    return (path / RESOLVED_RECIPE).is_file() or (path / SUMMARY).is_file() or (path / STATUS).is_file()


def load_chat_model(path: str | Path) -> ChatModel:
    """A finished run directory (adapter on its 4-bit base) or a model directory (a merged export)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    from qlora_pipe.models.loading import load_run_tokenizer, training_device

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"chat: directory not found: {path}")
    if _is_run_dir(path):
        from qlora_pipe.models.base_record import run_recipe

        run = resolve_run(path)
        recipe = run_recipe(run, "chat")
        from qlora_pipe.methods import method_for

        method = method_for(recipe)
        if refusal := method.refusal("chat", run):
            raise UserError(refusal)
        model = method.load_trained(recipe, run.root)
        tokenizer = load_run_tokenizer(run.root)
        source = f"{run.root} (4-bit base + adapter)"
        chat = ChatModel(model, tokenizer, training_system_prompt(run), source, recipe.generation)
        if (run.root / "processor_config.json").is_file():
            chat.processor = saved_processor(run.root, tokenizer)
    elif (path / "config.json").is_file():
        if any(
            a.endswith("ForSequenceClassification")
            for a in json.loads((path / "config.json").read_text()).get("architectures", [])
        ):
            raise UserError(f"chat: {path} is a classifier; load it with AutoModelForSequenceClassification")
        dtype = load_dtype_for(path)  # fp32 on a CPU that emulates bf16
        vision = (path / "processor_config.json").is_file()  # a vision-language model's export
        auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
        model = auto.from_pretrained(path, dtype=dtype, device_map={"": training_device()}).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        # export wrote the recipe's generation section into generation_config.json
        system = training_system_prompt(run_of_merged(path))
        chat = ChatModel(model, tokenizer, system, f"{path} (merged model)", model.generation_config)
        chat.processor = saved_processor(path, tokenizer) if vision else None
    else:
        raise UserError(f"chat: {path} is neither a run directory ({RESOLVED_RECIPE}) nor a model (config.json)")
    if not getattr(chat.tokenizer, "chat_template", None):
        raise UserError(f"chat: the tokenizer in {path} has no chat template")
    return chat


def saved_processor(folder: Path, tokenizer):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(folder))
    processor.tokenizer = tokenizer
    return processor


def load_image(path: str):
    """--image FILE: the picture, decoded (one line naming the file when it cannot be)."""
    from qlora_pipe.vision.images import BadImage, image_bytes, open_rgb

    try:
        return open_rgb(image_bytes(str(Path(path).expanduser().resolve()), None))
    except BadImage as exc:
        raise UserError(f"chat --image: {path}: {exc}") from exc


def prompt_inputs(chat: ChatModel, messages: list[dict]) -> dict:
    """The generate inputs of a conversation: its ids, and with --image the picture in the first user
    message, as the processor renders and expands it."""
    import torch

    if chat.image is None:
        ids = torch.tensor([chat_prompt_ids(chat.tokenizer, messages, chat.tools)], device=chat.model.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    first = next(i for i, m in enumerate(messages) if m["role"] == "user")
    parts = [{"type": "image"}, {"type": "text", "text": messages[first]["content"]}]
    shown = [*messages[:first], {"role": "user", "content": parts}, *messages[first + 1 :]]
    text = chat.processor.apply_chat_template(shown, add_generation_prompt=True)
    out = chat.processor(text=[text], images=[[chat.image]], add_special_tokens=False, return_tensors="pt")
    return {k: v.to(chat.model.device) for k, v in out.items() if isinstance(v, torch.Tensor)}


def check_generation_flags(max_new_tokens: int | None, temperature: float | None, top_p: float | None) -> None:
    """Reject impossible settings before any model is loaded."""
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UserError(f"chat: --max-new-tokens must be at least 1 (got {max_new_tokens})")
    if temperature is not None and temperature <= 0:
        raise UserError(f"chat: --temperature must be > 0 (got {temperature}); use --greedy for greedy decoding")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"chat: --top-p must be in (0, 1] (got {top_p})")


def resolve_settings(
    generation_config,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    greedy: bool = False,
) -> GenerationSettings:
    """Flags over the defaults (the recipe's generation section or a generation_config.json, which use the
    same names); greedy unless the defaults or a flag ask for sampling."""
    check_generation_flags(max_new_tokens, temperature, top_p)
    sample = bool(getattr(generation_config, "do_sample", False)) or temperature is not None or top_p is not None
    return GenerationSettings(
        max_new_tokens=max_new_tokens or getattr(generation_config, "max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS,
        do_sample=sample and not greedy,
        temperature=temperature if temperature is not None else getattr(generation_config, "temperature", None),
        top_p=top_p if top_p is not None else getattr(generation_config, "top_p", None),
    )


def stream_reply(chat: ChatModel, messages: list[dict[str, str]], settings: GenerationSettings) -> str:
    """Generate one answer, printing tokens as they come; Ctrl-C stops this answer and keeps what was said."""
    import torch
    from transformers import TextStreamer

    tokenizer = chat.tokenizer
    inputs = prompt_inputs(chat, messages)
    pieces: list[str] = []

    class Collector(TextStreamer):  # prints like TextStreamer and keeps the text for the conversation
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            pieces.append(text)
            super().on_finalized_text(text, stream_end)

    streamer = Collector(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stops = stop_token_ids(tokenizer, chat.model.generation_config)
    try:
        with torch.no_grad():
            chat.model.generate(
                **inputs,
                streamer=streamer,
                **settings.generate_kwargs(stops, tokenizer.pad_token_id),
            )
    except KeyboardInterrupt:
        streamer.end()
        print("[stopped]", flush=True)
    reply = "".join(pieces).strip()
    if chat.tools:
        for call in parse_tool_calls(reply):
            print(f"[tool call, not executed] {call.show()}", flush=True)
    return reply


def assistant_turn(reply: str, tools: list[dict] | None) -> dict:
    """The reply as the conversation keeps it: with its parsed tool calls when it made any."""
    calls = [c for c in parse_tool_calls(reply) if c.name is not None] if tools else []
    if not calls:
        return {"role": "assistant", "content": reply}
    made = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments or {}}} for c in calls]
    return {"role": "assistant", "content": "", "tool_calls": made}


def load_tools(path: str) -> list[dict]:
    """--tools FILE.json: a list of JSON-schema functions, or {"tools": [...]}."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"chat --tools: file not found: {file}")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"chat --tools: {file}: not valid JSON ({exc})") from exc
    tools = check_tools(raw.get("tools") if isinstance(raw, dict) else raw)
    if isinstance(tools, str) or not tools:
        raise UserError(
            f"chat --tools: {file}: {tools or 'no functions listed'} (give a list of JSON-schema functions)"
        )
    return tools


def one_shot(chat: ChatModel, prompt: str, system: str | None, settings: GenerationSettings) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return stream_reply(chat, messages, settings)


def chat_loop(
    chat: ChatModel,
    system: str | None,
    settings: GenerationSettings,
    read: Callable[[str], str] = input,
) -> list[dict[str, str]]:
    """Multi-turn chat: /reset clears the conversation, /exit or Ctrl-D ends it. Returns the last conversation."""
    history: list[dict[str, str]] = []
    print(f"chatting with {chat.source}; {settings.describe()}")
    print(f"system prompt: {system!r}" if system else "no system prompt")
    if chat.tools:
        print(f"tools: {', '.join(t['function']['name'] for t in chat.tools)}; /tool RESULT answers a tool call")
    print("/reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer", flush=True)
    while True:
        try:
            line = read("\nyou> ").strip()
        except EOFError:
            print()
            return history
        except KeyboardInterrupt:  # at the prompt: a fresh line, like a shell
            print("\n(Ctrl-D or /exit quits)")
            continue
        if line in ("/exit", "/quit"):
            return history
        if line == "/reset":
            history.clear()
            print("(conversation cleared)")
            continue
        if not line:
            continue
        if line.startswith("/tool ") and chat.tools:  # the result of the tool the model called, as you ran it
            history.append({"role": "tool", "content": line.removeprefix("/tool ").strip()})
        else:
            history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        system_turn = [{"role": "system", "content": system}] if system else []
        history.append(assistant_turn(stream_reply(chat, system_turn + history, settings), chat.tools))


def run_chat(
    path: str,
    prompt: str | None,
    system: str | None,
    settings_flags: dict,
    tools_path: str | None = None,
    image_path: str | None = None,
) -> int:
    """The chat command: one answer for --prompt, else an interactive session (``image_path``: a picture shown
    with the first message, for a vision-language model)."""
    check_generation_flags(settings_flags["max_new_tokens"], settings_flags["temperature"], settings_flags["top_p"])
    tools = load_tools(tools_path) if tools_path else None
    image = load_image(image_path) if image_path else None
    chat = load_chat_model(path)
    if image is not None:
        if chat.processor is None:
            raise UserError(f"chat --image: {path} is a text model (no image processor); leave out --image")
        chat.image = image
    if tools:
        if not probe_template(chat.tokenizer, None).renders_tools:
            raise UserError(f"chat --tools: the chat template of {path} does not render tools")
        chat.tools = tools
    settings = resolve_settings(chat.defaults or chat.model.generation_config, **settings_flags)
    system = chat.system if system is None else (system or None)  # --system "" drops the default
    if prompt is not None:
        one_shot(chat, prompt, system, settings)
    else:
        chat_loop(chat, system, settings)
    return 0
