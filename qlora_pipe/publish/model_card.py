"""Model cards (README.md with Hub metadata) generated from a run: what, how, results, usage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlora_pipe.recipe import Recipe
from qlora_pipe.recipe.model_source import is_local
from qlora_pipe.runs import EVAL_REPORT, RunDir

TAGS = ["qlora", "lora", "sft", "trl", "peft", "qlora-pipe"]


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def base_license(recipe: Recipe) -> str | None:
    """The base model's license when its local card says it (offline: no Hub lookups here)."""
    card = Path(recipe.model.name_or_path) / "README.md"
    if card.is_file():
        from huggingface_hub import ModelCard

        return ModelCard.load(card).data.to_dict().get("license")
    return None


def _metadata(recipe: Recipe, library: str) -> dict[str, Any]:
    from huggingface_hub import ModelCardData

    datasets = [s.hub for s in recipe.data.train_sources() if s.hub]
    name = recipe.model.name_or_path
    local = is_local(name)
    data = ModelCardData(
        base_model=None if local else name,  # the Hub only accepts Hub ids here
        library_name=library,
        pipeline_tag="text-generation",
        tags=TAGS if library == "peft" else [*TAGS, "merged"],
        datasets=datasets or None,
        license=base_license(recipe),
        language=["en"],
    )
    return data


def _gguf_line(recipe: Recipe) -> list[str]:
    from qlora_pipe.models.gguf_source import base_source

    source = base_source(recipe)
    if source is None:
        return []
    return [
        f"- Starting weights: the GGUF file `{Path(source['gguf']).name}` ({source['quantization']}, sha256 "
        f"{source['sha256'][:16]}...), dequantized once to bf16; the 4-bit base was quantized from those"
    ]


def _training_section(run: RunDir, recipe: Recipe) -> str:
    from qlora_pipe.methods import method_for

    method = method_for(recipe)
    summary = _json(run.summary)
    q, lora, t = recipe.quantization, recipe.lora, recipe.training
    sources = ", ".join(Path(s.path).name if s.path else s.label() for s in recipe.data.train_sources())
    lines = [
        "## Training",
        "",
        f"- Base model: `{recipe.model.name_or_path}`, loaded in 4-bit {q.quant_type.upper()}"
        f"{' with double quantization' if q.double_quant else ''} (compute {q.compute_dtype})"
        if q.enabled
        else f"- Base model: `{recipe.model.name_or_path}` in 16-bit",
        *_gguf_line(recipe),
        f"- LoRA: r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, target modules {lora.target_modules}"
        f"{', rsLoRA' if lora.use_rslora else ''}{', DoRA' if lora.use_dora else ''}",
        method.card_line(recipe, sources),
        f"- Optimizer {t.optimizer}, learning rate {t.learning_rate}, {t.lr_scheduler} schedule, "
        f"precision {t.precision}",
    ]
    if summary:
        lines += [
            f"- Steps: {summary.get('steps')}, trained tokens: {summary.get('supervised_tokens'):,}, "
            f"training time {summary.get('train_seconds')} s on {summary.get('device')}",
            "",
            "## Results",
            "",
            "| | value |",
            "|---|---|",
            f"| eval loss before training | {_fmt(summary.get('eval_loss_before'))} |",
            f"| eval loss after training | {_fmt(summary.get('final_eval_loss'))} |",
            f"| final train loss | {_fmt(summary.get('final_train_loss'))} |",
        ]
        held_out = [  # summary key, what is shown, its value and the note beside it
            ("held_out_reward_accuracy", "reward accuracy", "reward_accuracy", "mean margin {mean_margin} nats"),
            ("held_out_label_separation", "label AUC", "label_auc", "desirable vs undesirable log-prob per token"),
            ("held_out", "accuracy", "accuracy", "macro-F1 {macro_f1}"),
            ("held_out_rewards", "share fully correct", "fully_correct", "weighted reward {weighted_reward}"),
        ]
        for key, name, value, note in held_out:
            scores = summary.get(key) or {}
            for when in ("before", "after"):
                if when in scores:
                    row = scores[when]
                    lines.append(
                        f"| held-out {name} {when} training | {_fmt(row[value])} ({note.format_map(_Shown(row))}) |"
                    )
    if run.loss_curve.is_file():
        lines += ["", "![loss curves](loss.png)"]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class _Shown(dict):
    """A held-out row's values as the card shows them (floats to 4 places; None, no value: n/a)."""

    def __getitem__(self, key: str) -> str:
        return _fmt(super().__getitem__(key))


def _eval_section(run: RunDir, recipe: Recipe, merged: Path | None = None) -> str:
    """The base-vs-tuned table of `qlora-pipe eval`, when it was run: the merged model's own, else the run's."""
    from qlora_pipe.evaluate.metrics import eval_heading, eval_table

    paths = ([merged / EVAL_REPORT] if merged else []) + [run.eval_report]
    result = next((_json(p) for p in paths if p.is_file()), None)
    if not result:
        return ""
    from qlora_pipe.methods import method_for

    if (table := method_for(recipe).eval_table(result, markdown=True)) is not None:
        return f"## Evaluation\n\n{table}\n\n"
    return f"## Evaluation\n\n{eval_heading(result)}.\n\n{eval_table(result, markdown=True)}\n\n"


def _template_note() -> str:
    return (
        "## Chat template\n\nThe tokenizer in this repository carries the exact chat template used in training "
        "(`chat_template.jinja`). Render prompts with `tokenizer.apply_chat_template(..., "
        "add_generation_prompt=True)` so serving sees the same text; generation stops at the tokenizer's EOS."
    )


def peft_snippet(recipe: Recipe, repo_id: str) -> str:
    """Python that loads the base exactly as it was trained (4-bit, same settings) and the adapter on it."""
    base = recipe.model.name_or_path
    q = recipe.quantization
    dtype = q.compute_dtype if q.compute_dtype != "auto" else "bfloat16"
    from qlora_pipe.methods import method_for

    method = method_for(recipe)
    auto, labels = method.auto_class, method.card_load_arguments(recipe)
    if not q.enabled:
        inline = labels.strip().replace(",", ", ") if labels else ""
        load = f'base = {auto}.from_pretrained("{base}", {inline}dtype=torch.{dtype})'
        imports = f"from transformers import {auto}, AutoTokenizer"
    else:
        storage = f"\n        bnb_4bit_quant_storage=torch.{q.quant_storage}," if q.quant_storage != "uint8" else ""
        kept = method.kept_unquantized
        skip = f"\n        llm_int8_skip_modules={json.dumps(list(kept))}," if kept else ""
        load = (
            f'base = {auto}.from_pretrained(\n    "{base}",\n{labels}'
            "    quantization_config=BitsAndBytesConfig(\n"
            f'        load_in_4bit=True,\n        bnb_4bit_quant_type="{q.quant_type}",\n'
            f"        bnb_4bit_use_double_quant={q.double_quant},\n        bnb_4bit_compute_dtype=torch.{dtype},"
            f"{storage}{skip}\n    ),\n    dtype=torch.{dtype},\n)"
        )
        imports = f"from transformers import {auto}, AutoTokenizer, BitsAndBytesConfig"
    return (
        f"import torch\nfrom peft import PeftModel\n{imports}\n\n{load}\n"
        f'model = PeftModel.from_pretrained(base, "{repo_id}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
    )


def adapter_card(run: RunDir, recipe: Recipe, repo_id: str) -> str:
    from huggingface_hub import ModelCard

    from qlora_pipe.export.serving import vllm_lora_notes
    from qlora_pipe.methods import method_for

    method = method_for(recipe)
    notes = vllm_lora_notes(recipe) + ([] if method.serves_chat else ["a classifier"])
    vllm = (
        f"Not servable as a vLLM LoRA ({'; '.join(notes)}): serve the merged model instead."
        if notes
        else f"```bash\nvllm serve {recipe.model.name_or_path} --enable-lora --max-lora-rank "
        f"{vllm_rank(recipe.lora.r)} --lora-modules adapter={repo_id}\n```"
    )
    how = "in 4-bit, as trained" if recipe.quantization.enabled else "in 16-bit, as trained"
    usage = f"""## Usage

With PEFT, the base loaded {how} (the model the fidelity and eval figures describe; a 16-bit base
under the same adapter is a different model):

```python
{peft_snippet(recipe, repo_id)}```

With vLLM's LoRA serving (the base in 16-bit there, so answers can differ slightly from the 4-bit model):

{vllm}
"""
    body = (
        f"# {repo_id.split('/')[-1]}\n\nA LoRA adapter for `{recipe.model.name_or_path}`, trained with "
        f"qlora-pipe (QLoRA: 4-bit base, LoRA adapters, supervised fine-tuning with TRL).\n\n"
        f"{_training_section(run, recipe)}\n\n{_eval_section(run, recipe)}{usage}\n"
        f"{_template_note() if method.serves_chat else ''}\n"
    )
    return ModelCard.from_template(
        _metadata(recipe, "peft"), template_str="---\n{{ card_data }}\n---\n\n" + body
    ).content


def vllm_rank(r: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds rank r."""
    return next((size for size in (8, 16, 32, 64, 128, 256, 320, 512) if size >= r), r)


def _kept_text(kept: dict[str, Any] | None) -> str:
    if not kept:
        return ""
    return (
        f" Share of the learned LoRA delta the merged weights carry: {kept['mean']:.4f} on average over "
        f"{kept['layers']} layers, {kept['worst']:.4f} in the worst ({kept['worst_layer']})."
    )


def merged_card(run: RunDir, recipe: Recipe, repo_id: str, merged: Path) -> str:
    from huggingface_hub import ModelCard

    fidelity = _json(merged / "fidelity.json")
    info = _json(merged / "export_info.json")
    fidelity_text = ""
    if fidelity:
        fidelity_text = (
            "## Fidelity\n\nThe merged weights are the dequantized NF4 weights the adapter was trained against "
            f"plus the LoRA delta, in {info.get('dtype', 'bfloat16')}. Against the trained model (4-bit base + "
            f"adapter) on {fidelity.get('examples')} held-out examples: eval loss "
            f"{_fmt(fidelity.get('eval_loss_trained'))}"
            f" vs {_fmt(fidelity.get('eval_loss_merged'))}, mean absolute logit difference "
            f"{_fmt(fidelity.get('mean_abs_logit_diff'))}, top-1 agreement {_fmt(fidelity.get('top1_agreement'))}."
            f"{_kept_text(info.get('delta_kept'))}\n"
        )
    usage = f"""## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
```

Serving:

- vLLM: `vllm serve {repo_id}`
- llama.cpp and Ollama: `qlora-pipe export RUN --format gguf --gguf-type q8_0` writes a GGUF checked against
  these weights and an Ollama `Modelfile` (`ollama create NAME -f Modelfile`); `llama-server -m FILE.gguf`
  reads the chat template and end-of-turn token from the file.
"""
    body = (
        f"# {repo_id.split('/')[-1]}\n\n`{recipe.model.name_or_path}` with a qlora-pipe LoRA adapter merged in.\n\n"
        f"{_training_section(run, recipe)}\n\n{_eval_section(run, recipe, merged)}{fidelity_text}\n{usage}\n"
        f"{_template_note()}\n"
    )
    metadata = _metadata(recipe, "transformers")
    return ModelCard.from_template(metadata, template_str="---\n{{ card_data }}\n---\n\n" + body).content
