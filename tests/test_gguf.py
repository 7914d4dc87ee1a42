"""Serving what was trained: serving-clean templates and tokenizer files, GGUF through llama.cpp's own
converter read back with the gguf library, Ollama Modelfiles rendered by Go's text/template, and
llama.cpp's runtime beside the trained model (when llama-cpp-python is installed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

from qlora_pipe.errors import UserError
from qlora_pipe.export.ollama import FAMILIES, PROBES, family_template, modelfile, render
from qlora_pipe.export.serving import has_generation_tags, serving_template
from tests.conftest import REPO

TEMPLATES = REPO / "qlora_pipe/data/template_files"
TOKENS = {"chatml": ("", "<|endoftext|>"), "llama-3": ("<|begin_of_text|>", "<|eot_id|>"), "mistral": ("<s>", "</s>")}


def training_templates() -> dict[str, str]:
    from qlora_pipe.quickstart.builder import CHAT_TEMPLATE

    found = {path.stem: path.read_text() for path in sorted(TEMPLATES.glob("*.jinja"))}
    return {**found, "quickstart": CHAT_TEMPLATE}


@pytest.mark.parametrize("name", list(training_templates()))
def test_serving_template_parses_with_plain_jinja2_and_renders_the_training_text(name, tokenizer):
    training = training_templates()[name]
    assert has_generation_tags(training)
    with pytest.raises(jinja2.TemplateSyntaxError, match="generation"):  # what every serving engine hit
        jinja2.Environment().from_string(training)
    serving = serving_template(training)
    assert not has_generation_tags(serving)
    for probe in PROBES:
        # transformers renders the training template (it knows the tag); plain jinja2 the serving one.
        trained_text = tokenizer.apply_chat_template(
            probe, chat_template=training, tokenize=False, add_generation_prompt=True
        )
        bos, eos = tokenizer.bos_token or "", tokenizer.eos_token
        assert render(serving, probe, bos, eos) == trained_text


def test_a_served_folder_loads_and_a_run_keeps_its_training_template(make_recipe, tmp_path, capsys):
    from transformers import AutoTokenizer

    from qlora_pipe.export.command import export_merged
    from qlora_pipe.training.stage import run_training

    result = run_training(make_recipe(max_steps=2))
    run = result.run_dir.root
    assert has_generation_tags((run / "chat_template.jinja").read_text())  # the run keeps what it trained with
    from qlora_pipe.cli import main

    # A GGUF type that does not exist: one line, exit 2, before the merge (nothing written).
    assert main(["export", str(run), "--format", "gguf", "--gguf-type", "q3"]) == 2
    assert "--gguf-type q3: choose one of f16, bf16, q8_0" in capsys.readouterr().err
    assert not (run / "merged").exists() and not (run / "gguf").exists()
    out = export_merged(run, verify=False).out
    served = (out / "chat_template.jinja").read_text()
    assert served == serving_template((run / "chat_template.jinja").read_text())
    config = json.loads((out / "tokenizer_config.json").read_text())
    # transformers 4 (what serving engines pin) has no TokenizersBackend and reads special tokens as a list
    # only under additional_special_tokens: the served config names what both versions load.
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "extra_special_tokens" not in config
    loaded, trained = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(run)
    text = "<|im_start|>user\nWhat is a tort?<|im_end|>\n"
    assert loaded(text)["input_ids"] == trained(text)["input_ids"] and loaded.eos_token == trained.eos_token
    # The adapter names its local base by an absolute path: PEFT loads it from any working directory.
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]).is_absolute()
    probe = "ids = torch.tensor([[1, 5, 9, 13, 40]])\nwith torch.no_grad():\n    out = model(input_ids=ids).logits[0]\n"
    show = (
        "import json\nfour_bit = getattr(base, 'is_loaded_in_4bit', False)\n"
        "print(json.dumps({'4bit': four_bit, 'logits': out.float().tolist()}))\n"
    )
    code = (
        "import torch\nfrom peft import AutoPeftModelForCausalLM\n"
        f"model = AutoPeftModelForCausalLM.from_pretrained({str(run)!r})\nbase = model.base_model.model\n"
    )
    done = subprocess.run([sys.executable, "-c", code + probe + show], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-1500:]
    sixteen_bit = json.loads(done.stdout.strip().splitlines()[-1])

    # The model card's PEFT snippet, run as a user would: it loads the base in 4-bit as trained, so its
    # logits are the trained model's (the reference of the card's fidelity figures), not a 16-bit base's.
    import torch

    from qlora_pipe.models.loading import load_trained_model
    from qlora_pipe.publish.model_card import peft_snippet
    from qlora_pipe.recipe import load_recipe

    recipe = load_recipe(result.run_dir.resolved_recipe)
    done = subprocess.run(
        [sys.executable, "-c", peft_snippet(recipe, str(run)) + probe + show],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-1500:]
    snippet = json.loads(done.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        trained = load_trained_model(recipe, run)(input_ids=torch.tensor([[1, 5, 9, 13, 40]])).logits[0].float()
    assert snippet["4bit"] is True and not sixteen_bit["4bit"]
    near = (torch.tensor(snippet["logits"]) - trained).abs().max().item()
    far = (torch.tensor(sixteen_bit["logits"]) - trained).abs().max().item()
    assert near <= 0.05 and far > 4 * near  # within bf16 rounding of the trained model; the 16-bit base is not


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_ollama_template_renders_like_the_chat_template_in_go(family):
    if shutil.which("go") is None:
        pytest.skip("Go is not installed: Ollama's text/template cannot be run here (apt install golang-go)")
    bos, eos = TOKENS[family.name]
    text = modelfile("m.gguf", family_template(family), bos, eos, None, {"do_sample": False}, add_bos=True)
    go_template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    for probe in PROBES:
        payload = json.dumps({"template": go_template, "messages": probe})
        command = ["go", "run", str(REPO / "tests/go_template/render.go")]
        done = subprocess.run(command, input=payload, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        # llama.cpp adds BOS itself (add_bos_token); the rest is the same text.
        assert done.stdout == render(family_template(family), probe, bos, eos).removeprefix(bos)


def test_modelfile_stops_at_end_of_turn_and_refuses_a_template_it_cannot_translate():
    chatml = family_template(FAMILIES[0])
    text = modelfile(
        "q.gguf", chatml, "", "<|endoftext|>", "Be brief.", {"do_sample": False, "max_new_tokens": 64}, True
    )
    assert 'PARAMETER stop "<|im_end|>"' in text and 'SYSTEM """Be brief."""' in text
    assert "PARAMETER temperature 0" in text and "PARAMETER num_predict 64" in text
    # A template that adds its own default system prompt (as Qwen2.5's does): that prompt becomes SYSTEM.
    qwen_like = chatml.replace(
        "{%- for message in messages -%}",
        "{%- if messages[0]['role'] != 'system' -%}{{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' -}}"
        "{%- endif -%}{%- for message in messages -%}",
    )
    assert 'SYSTEM """You are Qwen."""' in modelfile("q.gguf", qwen_like, "", "<|endoftext|>", None, {}, True)
    alpaca = "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}### assistant:\n"
    with pytest.raises(UserError, match="renders like none of the families"):
        modelfile("q.gguf", alpaca, "", "</s>", None, {}, True)


def test_gguf_type_and_setup_errors_are_one_line_before_any_work(monkeypatch, tmp_path):
    from qlora_pipe.export.gguf import ENV_CONVERTER, check_gguf_type

    with pytest.raises(UserError, match="--gguf-type q3: choose one of f16, bf16, q8_0"):
        check_gguf_type("q3")
    monkeypatch.setenv(ENV_CONVERTER, str(tmp_path))
    with pytest.raises(UserError, match=r"no convert_hf_to_gguf\.py there"):
        check_gguf_type("f16")
    monkeypatch.delenv(ENV_CONVERTER)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError, match="run `qlora-pipe setup-gguf` once"):
        check_gguf_type("f16")


def test_an_architecture_the_converter_lacks_is_refused_with_the_reason(converter, tokenizer_dir_for_gguf, tmp_path):
    from qlora_pipe.export.gguf import convert

    folder = tmp_path / "odd"
    shutil.copytree(tokenizer_dir_for_gguf, folder)
    (folder / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"], "num_hidden_layers": 1}))
    with pytest.raises(UserError, match="converter does not support NoSuchForCausalLM"):
        convert(folder, tmp_path / "odd.gguf", "f16", tmp_path / "convert.log")
    assert not (tmp_path / "odd.gguf").exists()


FULL_DISK_CONVERT = """
import sys
from pathlib import Path
from qlora_pipe.errors import UserError
from qlora_pipe.export.gguf import convert
try:
    convert(Path(sys.argv[1]), Path(sys.argv[2]), "f16", Path(sys.argv[3]))
except UserError as exc:
    print(exc)
"""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux): every write fails with ENOSPC")
def test_a_full_disk_during_conversion_is_named(converter, tiny_model_dir, tmp_path):
    """The disk fills while the converter writes: the GGUF and the log both fail to write (each is /dev/full,
    where every write ends in ENOSPC). The error names the cause and where, not an empty reason and an
    empty log. In its own process with a time limit: reading a log that is /dev/full never ends."""
    folder = tmp_path / "gguf"
    folder.mkdir()
    for name in ("model-f16.gguf", "convert-f16.log"):
        (folder / name).symlink_to("/dev/full")
    args = [str(tiny_model_dir), str(folder / "model-f16.gguf"), str(folder / "convert-f16.log")]
    env = {**os.environ, "QLORA_PIPE_LLAMA_CPP": str(converter), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK_CONVERT, *args], capture_output=True, text=True, timeout=300, env=env
    )
    line = done.stdout.strip()
    assert line.startswith("export --format gguf: the conversion failed: no space left on the device holding "), line
    assert str(folder) in line and line.endswith("(log not written: No space left on device)"), line
    assert not (folder / "model-f16.gguf").is_symlink()  # the partial output, ours: removed


@pytest.fixture
def tokenizer_dir_for_gguf(tmp_path, tokenizer) -> Path:
    out = tmp_path / "tokenizer"
    tokenizer.save_pretrained(out)
    return out


def test_llama_cpp_answers_like_the_trained_model(make_recipe, converter):
    """llama.cpp itself on the GGUF: tokens, logits and greedy answers beside the trained model."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (pip install llama-cpp-python; it builds llama.cpp)")
    from qlora_pipe.export.command import export_merged
    from qlora_pipe.export.gguf_command import export_gguf
    from qlora_pipe.runs import RunDir
    from qlora_pipe.training.stage import run_training

    result = run_training(make_recipe(max_steps=4, preview_prompts=["What is a tort?", "Define estoppel."]))
    out = export_merged(result.run_dir.root, verify=False).out
    runtime = export_gguf(RunDir(result.run_dir.root), out, "f16")["llama_cpp"]
    assert "failed" not in runtime, runtime
    assert runtime["tokenization_identical"] == f"{runtime['examples']}/{runtime['examples']}"
    assert runtime["top1_agreement"] >= 0.95 and runtime["relative_loss_change"] <= 0.01
    assert runtime["greedy_identical"].split("/")[1] == "2"


@pytest.mark.skipif(
    os.environ.get("QLORA_PIPE_SLOW_TESTS") != "1",
    reason="installs transformers 4.57.6 into its own venv from PyPI (about a minute): set QLORA_PIPE_SLOW_TESTS=1",
)
def test_served_tokenizer_loads_with_the_transformers_serving_engines_pin(tokenizer, tmp_path):
    """transformers 4.57.6 (llama.cpp's converter pins it; vLLM releases pin 4.x) reads the served tokenizer
    to the same tokens and the same rendered chat as ours."""
    from qlora_pipe.export.serving import make_serving_files

    folder = tmp_path / "served"
    tokenizer.save_pretrained(folder)
    make_serving_files(folder)
    venv = tmp_path / "tf4"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q", "transformers==4.57.6", "jinja2"]
    subprocess.run(pip, check=True, capture_output=True)
    probe = [{"role": "user", "content": "What is a tort?"}, {"role": "assistant", "content": "A civil wrong."}]
    code = (
        "import json, sys\nfrom transformers import AutoTokenizer\n"
        f"t = AutoTokenizer.from_pretrained({str(folder)!r})\nprobe = json.loads(sys.argv[1])\n"
        "text = t.apply_chat_template(probe, tokenize=False)\n"
        "print(json.dumps({'text': text, 'ids': t(text, add_special_tokens=False)['input_ids'], 'eos': t.eos_token}))"
    )
    done = subprocess.run([str(venv / "bin/python"), "-c", code, json.dumps(probe)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-1500:]
    old = json.loads(done.stdout.strip().splitlines()[-1])
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    assert old == {
        "text": text,
        "ids": tokenizer(text, add_special_tokens=False)["input_ids"],
        "eos": tokenizer.eos_token,
    }


def test_vllm_lora_rules_are_checked_from_the_recipe(tiny_model_dir, tmp_path):
    """What vLLM's LoRA loader takes: no DoRA, no fully trained modules, a rank it has a slot size for."""
    from qlora_pipe.export.serving import vllm_lora_notes
    from qlora_pipe.publish.model_card import vllm_rank
    from qlora_pipe.recipe import validate_recipe
    from tests.conftest import recipe_dict

    def recipe(**lora):
        raw = recipe_dict(tiny_model_dir, tmp_path / "runs")
        raw["lora"].update(lora)
        return validate_recipe(raw)

    assert vllm_lora_notes(recipe()) == []
    assert [vllm_rank(r) for r in (4, 8, 12, 64, 300)] == [8, 8, 16, 64, 320]
    notes = vllm_lora_notes(recipe(use_dora=True, modules_to_save=["lm_head"]))
    assert any("DoRA" in n for n in notes) and any("lm_head" in n for n in notes)
