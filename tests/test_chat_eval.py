"""`chat` and `eval` on a tiny real 4-bit run trained once for this module.

The run learns one short answer ("Yes, it is a legal term.") followed by its end-of-turn token,
so the tuned model stops early and deterministically while the untrained base never stops.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from qlora_pipe.cli import main
from qlora_pipe.evaluate.chat import chat_loop, load_chat_model
from qlora_pipe.evaluate.evaluation import run_eval
from qlora_pipe.export.verdict import MAX_RELATIVE_LOSS_CHANGE
from qlora_pipe.models.generation import GenerationSettings, chat_prompt_ids, generate_greedy
from qlora_pipe.publish.model_card import adapter_card, merged_card
from qlora_pipe.recipe import load_recipe, validate_recipe
from qlora_pipe.runs import RunDir, run_of_merged, training_system_prompt
from tests.conftest import recipe_dict

SYSTEM = "You answer in one short sentence."
ANSWER = "Yes, it is a legal term."
TOPICS = ["contract", "tort", "lease", "deed", "will", "trust", "lien", "bond", "claim", "appeal", "court", "jury"]
QUESTION = "Is a lease a legal term? (7)"


def _row(i: int, topic: str) -> dict:
    user = f"Is a {topic} a legal term? ({i})"
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}, _reply(ANSWER)]}


def _reply(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """A tiny model gains nothing from a second thread; on a machine shared with other work, two OpenMP
    threads spin-wait for each other and this module ran 13x slower (measured: 204 s vs 15 s)."""
    import torch

    before, setting = torch.get_num_threads(), os.environ.get("QLORA_PIPE_CPU_THREADS")
    torch.set_num_threads(1)
    os.environ["QLORA_PIPE_CPU_THREADS"] = "1"  # the commands called below set threads from it
    yield
    torch.set_num_threads(before)
    if setting is None:
        os.environ.pop("QLORA_PIPE_CPU_THREADS")
    else:
        os.environ["QLORA_PIPE_CPU_THREADS"] = setting


@pytest.fixture(scope="module")
def short_run(tiny_model_dir, tmp_path_factory) -> Path:
    from qlora_pipe.training.stage import run_training

    root = tmp_path_factory.mktemp("chat-eval")
    train, held_out = root / "train.jsonl", root / "eval.jsonl"
    train.write_text("".join(json.dumps(_row(i, TOPICS[i % 12])) + "\n" for i in range(32)))
    held_out.write_text("".join(json.dumps(_row(100 + i, TOPICS[(5 * i) % 12])) + "\n" for i in range(8)))
    raw = recipe_dict(tiny_model_dir, root / "runs", max_steps=8, report_to=["none"])
    raw["data"].update(train_path=str(train), eval_path=str(held_out))
    return run_training(validate_recipe(raw)).run_dir.root


@pytest.fixture(scope="module")
def chat_model(short_run):
    return load_chat_model(short_run)


@pytest.fixture(scope="module")
def adapter_eval(short_run) -> tuple[int, str, dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["eval", str(short_run), "--batch-size", "4"])
    return code, out.getvalue(), json.loads((short_run / "eval.json").read_text())


@pytest.fixture(scope="module")
def merged_dir(short_run) -> Path:
    from qlora_pipe.export.command import export_merged

    with contextlib.redirect_stdout(io.StringIO()):
        return export_merged(short_run).out


def test_chat_one_shot_is_greedy_deterministic_and_stops_at_end_of_turn(short_run, chat_model, capsys):
    args = ["chat", str(short_run), "--prompt", QUESTION, "--max-new-tokens", "24"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first

    tokenizer, model = chat_model.tokenizer, chat_model.model
    assert chat_model.system == SYSTEM  # the training data's system prompt is the default
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    new = output[0, inputs["input_ids"].shape[1] :].tolist()
    assert new[-1] == tokenizer.eos_token_id and len(new) < 24  # stopped at the end-of-turn token
    assert first.strip() == tokenizer.decode(new, skip_special_tokens=True).strip() == ANSWER


def test_chat_with_the_merged_model_gives_the_same_answer_and_can_sample(merged_dir, capsys):
    assert training_system_prompt(run_of_merged(merged_dir)) == SYSTEM  # found through export_info.json
    assert main(["chat", str(merged_dir), "--prompt", QUESTION, "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out.strip() == ANSWER
    sampled = ["chat", str(merged_dir), "--prompt", QUESTION, "--temperature", "0.7", "--top-p", "0.9"]
    assert main(sampled) == 0 and capsys.readouterr().out.strip()
    assert main([*sampled, "--greedy", "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out.strip() == ANSWER


def test_interactive_chat_resets_and_exits_on_ctrl_d(short_run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n/reset\nIs a deed a legal term? (3)\n"))
    assert main(["chat", str(short_run), "--max-new-tokens", "24"]) == 0  # stdin ends: Ctrl-D
    out = capsys.readouterr().out
    assert out.count(f"assistant> {ANSWER}") == 2 and "(conversation cleared)" in out


def _typed(lines: list[str]):
    """What a user types, then Ctrl-D."""
    remaining = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(remaining)
        except StopIteration:
            raise EOFError from None

    return read


def test_chat_loop_history_reset_and_ctrl_c_stops_only_the_answer(chat_model, capsys, monkeypatch):
    typed = _typed([QUESTION, "Is a bond a legal term? (4)", "/reset", "Is a deed a legal term? (3)"])
    history = chat_loop(chat_model, SYSTEM, GenerationSettings(max_new_tokens=24), typed)
    assert history == [{"role": "user", "content": "Is a deed a legal term? (3)"}, _reply(ANSWER)]
    assert "(conversation cleared)" in capsys.readouterr().out

    # A real SIGINT, raised as the base model (which never stops by itself) hands the streamer its fifth token.
    from transformers import TextStreamer

    streamed = TextStreamer.put
    calls = []

    def put_then_interrupt(self, value) -> None:
        calls.append(value)
        streamed(self, value)
        if len(calls) == 5:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(TextStreamer, "put", put_then_interrupt)
    lines = iter(["Tell me everything.", "/exit"])
    # Python's own Ctrl-C handler, as in a terminal: a shell that starts the tests in the background ignores SIGINT.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with chat_model.model.disable_adapter():
            history = chat_loop(chat_model, None, GenerationSettings(max_new_tokens=1500), lambda prompt: next(lines))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "[stopped]" in capsys.readouterr().out
    assert len(history) == 2 and history[1]["content"]  # the partial answer is kept; the session went on
    assert len(chat_model.tokenizer(history[1]["content"])["input_ids"]) < 1500


def test_batched_left_padded_generation_equals_one_by_one(chat_model):
    tokenizer, model = chat_model.tokenizer, chat_model.model
    questions = ["hi", QUESTION, "Is a jury a legal term, and why does the law care about juries at all? (12)"]
    prompts = [
        chat_prompt_ids(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
        for q in questions
    ]
    for context in (contextlib.nullcontext(), model.disable_adapter()):  # tuned (stops), base (runs on)
        with context:
            batched = generate_greedy(model, tokenizer, prompts, max_new_tokens=16, batch_size=3)
            single = [generate_greedy(model, tokenizer, [p], max_new_tokens=16)[0] for p in prompts]
        assert batched == single
    assert tokenizer.padding_side == "right"  # restored after generating


def test_eval_reports_base_and_tuned_side_by_side(short_run, adapter_eval):
    code, out, report = adapter_eval
    assert code == 0
    base, tuned = report["base"], report["tuned"]
    assert tuned["loss"] < base["loss"] and tuned["perplexity"] < base["perplexity"]
    summary = json.loads((short_run / "summary.json").read_text())  # same masking as training's eval loss
    assert base["loss"] == pytest.approx(summary["eval_loss_before"], rel=1e-3)
    assert tuned["loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-3)
    assert tuned["exact_match"] == tuned["token_f1"] == tuned["rouge_l"] == 1.0
    assert base["exact_match"] == 0.0 and base["stopped_at_end_of_turn"] == 0.0
    assert tuned["stopped_at_end_of_turn"] == 1.0 and tuned["mean_answer_tokens"] < base["mean_answer_tokens"]
    assert report["examples"] == report["generated"] == len(report["answers"]) == 8
    assert report["answers"][0]["question"] == "Is a contract a legal term? (100)"
    assert report["answers"][0]["reference"] == ANSWER == report["answers"][0]["tuned"]
    assert "exact match" in out and "Q: Is a contract a legal term? (100)" in out and "eval.json" in out
    card = adapter_card(RunDir(short_run), load_recipe(short_run / "recipe.resolved.yaml"), "me/legal")
    assert "## Evaluation" in card and "| exact match | 0.0% | 100.0% |" in card


def test_eval_of_the_merged_model_agrees_with_the_adapter(short_run, adapter_eval, merged_dir):
    adapter = adapter_eval[2]
    merged = run_eval(short_run, batch_size=4, merged=True)
    assert merged["base"] == adapter["base"]
    relative = abs(merged["tuned"]["loss"] - adapter["tuned"]["loss"]) / adapter["tuned"]["loss"]
    assert relative <= MAX_RELATIVE_LOSS_CHANGE
    assert merged["tuned"]["exact_match"] == adapter["tuned"]["exact_match"]
    assert json.loads((merged_dir / "eval.json").read_text())["tuned_model"].startswith("merged model")
    card = merged_card(RunDir(short_run), load_recipe(short_run / "recipe.resolved.yaml"), "me/legal", merged_dir)
    assert "## Evaluation" in card and "tuned: merged model" in card


def test_eval_reads_other_data_formats_with_a_limit(short_run, tmp_path):
    alpaca = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": f"Is a {t} a legal term?", "input": "", "output": ANSWER} for t in TOPICS * 2]
    alpaca.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run_eval(short_run, data=str(alpaca), limit=20, batch_size=8, max_new_tokens=4)
    # 20 of 24 rows: the recipe's max_eval_samples (16) is about its own held-out set, not this file
    assert result["examples"] == result["generated"] == 20 and result["data"] == str(alpaca)
    assert result["answers"][0]["question"] == "Is a contract a legal term?"
    assert result["tuned"]["mean_answer_tokens"] <= 4


def test_bad_input_is_one_line_and_exit_code_2(short_run, tmp_path, capsys):
    missing = tmp_path / "nope"
    unfinished = tmp_path / "runs" / "half"
    unfinished.mkdir(parents=True)
    (unfinished / "status.json").write_text('{"state": "running"}')
    not_exported = tmp_path / "runs" / "copy"
    not_exported.mkdir()
    for name in ("summary.json", "recipe.resolved.yaml"):
        shutil.copy(short_run / name, not_exported / name)
    cases = [
        (["chat", str(missing), "--prompt", "hi"], str(missing)),
        (["eval", str(missing)], str(missing)),
        (["chat", str(unfinished), "--prompt", "hi"], "not a finished run"),
        (["eval", str(unfinished)], "not a finished run"),
        (["chat", str(tmp_path / "runs"), "--prompt", "hi"], "neither a run directory"),
        (["chat", str(missing), "--temperature", "0"], "--temperature must be > 0"),  # before any loading
        (["chat", str(short_run), "--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["eval", str(not_exported), "--merged"], "no merged model"),
        (["eval", str(short_run), "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
    ]
    if importlib.util.find_spec("lm_eval") is None:  # optional: a clear hint, before any model loads
        cases.append((["eval", str(short_run), "--lm-eval", "arc_easy"], "pip install 'lm-eval[hf]'"))
    for args, expected in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and expected in err[-1], (args, err)
    assert main(["eval", str(missing)]) == 2 and capsys.readouterr().err.count("\n") == 1


def test_generation_settings_come_from_the_recipe(short_run, merged_dir, tmp_path, capsys):
    import shutil

    import yaml

    from qlora_pipe.runs import RunDir

    # The export writes the recipe's generation section into the merged model's generation_config.json.
    generation = json.loads((merged_dir / "generation_config.json").read_text())
    assert generation["max_new_tokens"] == 256 and generation["do_sample"] is False
    assert "temperature" not in generation and "top_p" not in generation  # greedy: no sampling leftovers

    # A run whose recipe asks for 3 new tokens answers with 3 tokens when no flag overrides it.
    copy = tmp_path / "run"
    shutil.copytree(short_run, copy, ignore=shutil.ignore_patterns("checkpoints", "merged", "tensorboard"))
    resolved = RunDir(copy).resolved_recipe
    recipe = yaml.safe_load(resolved.read_text())
    recipe["generation"] = {"max_new_tokens": 3}
    resolved.write_text(yaml.safe_dump(recipe))
    assert main(["chat", str(copy), "--prompt", QUESTION]) == 0
    answer = capsys.readouterr().out.strip()
    tokenizer = load_chat_model(copy).tokenizer
    assert len(tokenizer(answer, add_special_tokens=False)["input_ids"]) <= 3 and ANSWER.startswith(answer)
    assert main(["chat", str(copy), "--prompt", QUESTION, "--max-new-tokens", "24"]) == 0  # the flag wins
    assert capsys.readouterr().out.strip() == ANSWER
