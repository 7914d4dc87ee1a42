"""The export of a classifier (task: classification): which base tensors it leaves out, and its config."""

from __future__ import annotations

import json
from pathlib import Path

from qlora_pipe.export.tensor_files import TensorReader
from qlora_pipe.models.classifier import label_maps


def unused_base_tensors(base: Path, shards: list[Path], recipe, classes: list[str]) -> set[str]:
    """Base checkpoint tensors the classifier (a head for ``classes``) does not have (the causal LM head)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(base, trust_remote_code=recipe.model.trust_remote_code)
    config.update(label_maps(classes))
    with init_empty_weights():
        skeleton = AutoModelForSequenceClassification.from_config(config)
    names = set(skeleton.state_dict())
    unused = set()
    for shard in shards:
        with TensorReader(shard) as reader:
            unused |= {name for name in reader.names() if name not in names}
    return unused


def write_classifier_config(folder: Path, classes: list[str], pad_token_id: int | None) -> None:
    """config.json of the merged model names the classifier class and its labels (``classes``)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    architecture = (config.get("architectures") or ["Model"])[0]
    for suffix in ("ForCausalLM", "LMHeadModel", "ForMaskedLM"):
        architecture = architecture.removesuffix(suffix)
    config["architectures"] = [architecture + "ForSequenceClassification"]
    maps = label_maps(classes)
    config.update(id2label={str(k): v for k, v in maps["id2label"].items()}, label2id=maps["label2id"])
    config["pad_token_id"] = pad_token_id
    path.write_text(json.dumps(config, indent=2) + "\n")
