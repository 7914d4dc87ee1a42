"""An Ollama ``Modelfile`` beside the GGUF: the chat template translated, stops, system prompt, decoding.

Ollama formats chats with a Go template, not the model's jinja one. The template family is recognised
by rendering probe conversations with the merged folder's serving template (plain jinja2, as engines
do) and with each family qlora-pipe bundles; only an exact match gets that family's Go template. A
template that matches none is refused with the reason, never given a wrong TEMPLATE. A default system
prompt the model's own template injects (Qwen2.5 does) becomes the Modelfile's SYSTEM when the
training data had none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qlora_pipe.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    template_file: str  # the bundled jinja template (qlora_pipe/data/template_files) it must render like
    go_template: str  # Ollama's TEMPLATE over .Messages (Ollama adds the SYSTEM line as a system message)
    end_of_turn: str  # the stop token, by name in the tokenizer ("eos": the tokenizer's eos token)
    default_system: str | None  # regex capturing a system prompt the template adds when there is none


CHATML = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
LLAMA_3 = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
    "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
MISTRAL = (
    '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{- $system = .Content }}{{- end }}'
    "{{- end }}{{- $first := true }}{{- range .Messages }}"
    '{{- if eq .Role "user" }}[INST] {{ if $first }}{{ if $system }}{{ $system }}\n\n{{ end }}{{ end }}'
    '{{- $first = false }}{{ .Content }} [/INST]{{- else if eq .Role "assistant" }} {{ .Content }}{{ eos }}'
    "{{- end }}{{- end }}"
)
FAMILIES = (
    Family("chatml", "chatml.jinja", CHATML, "<|im_end|>", r"^<\|im_start\|>system\n(.*?)<\|im_end\|>\n"),
    Family("llama-3", "llama-3.jinja", LLAMA_3, "<|eot_id|>", None),
    Family("mistral", "mistral.jinja", MISTRAL, "eos", None),
)
PROBES = (
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is an easement?"},
        {"role": "assistant", "content": "A right to use another's land."},
        {"role": "user", "content": "And a lien?"},
    ],
    [{"role": "user", "content": "What is a tort?"}],
    [
        {"role": "user", "content": "Define estoppel."},
        {"role": "assistant", "content": "A bar to contradicting earlier words."},
        {"role": "user", "content": "Thanks."},
    ],
)


def render(template: str, messages: list[dict], bos: str, eos: str) -> str:
    """Render as serving engines do: plain jinja2 in a sandbox, blocks trimmed, a generation prompt."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)


def family_template(family: Family) -> str:
    from importlib.resources import files

    from qlora_pipe.export.serving import serving_template

    return serving_template((files("qlora_pipe.data") / "template_files" / family.template_file).read_text())


def recognise(template: str, bos: str, eos: str) -> tuple[Family, str | None]:
    """The bundled family this template renders exactly like, and the default system prompt it adds."""
    for family in FAMILIES:
        reference = family_template(family)
        with_system = render(template, PROBES[0], bos, eos) == render(reference, PROBES[0], bos, eos)
        if not with_system:
            continue
        default = None
        for probe in PROBES[1:]:
            ours, theirs = render(template, probe, bos, eos), render(reference, probe, bos, eos)
            if ours == theirs:
                continue
            found = re.match(family.default_system, ours, re.S) if family.default_system else None
            system = [{"role": "system", "content": found.group(1)}] if found else []
            if not found or render(reference, system + probe, bos, eos) != ours:
                break
            default = found.group(1)
        else:
            return family, default
    names = ", ".join(f.name for f in FAMILIES)
    raise UserError(
        f"ollama: the chat template renders like none of the families qlora-pipe can translate ({names}); "
        "no Modelfile was written (write its TEMPLATE by hand, or serve with llama.cpp, which reads the "
        "template from the GGUF)"
    )


def modelfile(
    gguf_name: str,
    template: str,
    bos: str,
    eos: str,
    system: str | None,
    generation: dict,
    add_bos: bool,
    adapter: str | None = None,
) -> str:
    """The Modelfile text (with ``adapter``: the base GGUF plus a LoRA GGUF on it); raises UserError for a
    template it cannot translate."""
    family, default_system = recognise(template, bos, eos)
    go = family.go_template.replace("{{ eos }}", eos)
    if not add_bos and render(template, PROBES[1], bos, eos).startswith(bos) and bos:
        go = bos + go  # the template starts with BOS and llama.cpp will not add it
    stop = eos if family.end_of_turn == "eos" else family.end_of_turn
    lines = [f"# Ollama: ollama create NAME -f Modelfile  ({family.name} chat format)", f"FROM ./{gguf_name}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    lines.append(f'TEMPLATE """{go}"""')
    system = system if system is not None else default_system
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines.append(f'PARAMETER stop "{stop}"')
    if generation.get("do_sample"):
        lines += [f"PARAMETER temperature {generation['temperature']}", f"PARAMETER top_p {generation['top_p']}"]
    else:
        lines.append("PARAMETER temperature 0")
    if generation.get("max_new_tokens"):
        lines.append(f"PARAMETER num_predict {generation['max_new_tokens']}")
    return "\n".join(lines) + "\n"


def write_modelfile(folder: Path, text: str) -> Path:
    path = folder / "Modelfile"
    path.write_text(text, encoding="utf-8")
    return path
