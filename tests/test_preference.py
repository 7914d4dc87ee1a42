"""Preference tuning (method: dpo) on the same pipeline: rows checked and reported, a real DPO run on a tiny
4-bit model that moves the preference, exact resume, continuing an SFT adapter, export with fidelity."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from qlora_pipe.data.preference import prepare_preference_data, to_pair
from qlora_pipe.errors import UserError
from qlora_pipe.recipe import validate_recipe
from tests.conftest import REPO, recipe_dict
from tests.data_helpers import write_jsonl

PAIRS_TRAIN = REPO / "data/legal-qa/preference_train.jsonl"


def dpo_recipe(model_dir: Path, tmp_path: Path, name: str = "dpo", eval_path: Path = PAIRS_TRAIN, **training):
    raw = recipe_dict(model_dir, tmp_path / "runs", **training)
    raw.update(run_name=name, method="dpo", preference={"beta": 0.1})
    raw["data"].update(train_path=str(PAIRS_TRAIN), eval_path=str(eval_path), max_train_samples=16, max_eval_samples=16)
    return raw


def test_preference_rows_are_checked_and_dropped_by_reason(tokenizer, tiny_model_dir, tmp_path):
    assert to_pair({"prompt": "q", "chosen": "a"}) == "not a prompt/chosen/rejected row"
    assert to_pair({"prompt": "q", "chosen": "a", "rejected": "a"}) == "chosen and rejected are identical"
    assert to_pair({"prompt": "q", "chosen": " ", "rejected": "b"}) == "empty chosen or rejected answer"
    assistant_last = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert (
        to_pair({"prompt": assistant_last, "chosen": "a", "rejected": "b"})
        == "the prompt does not end with a user turn"
    )
    pair = to_pair({"prompt": "What is a tort?", "chosen": "A civil wrong.", "rejected": "A contract."})
    assert pair["prompt"] == [{"role": "user", "content": "What is a tort?"}]
    assert pair["chosen"] == [{"role": "assistant", "content": "A civil wrong."}]

    rows = [
        {"prompt": "What is a tort?", "chosen": "A civil wrong.", "rejected": "A contract."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a lien?"}],
         "chosen": {"role": "assistant", "content": "A claim on property."}, "rejected": "A tort."},
        {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."},
        {"prompt": "Empty?", "chosen": "", "rejected": "No."},
        {"prompt": "Long? " * 200, "chosen": "Yes.", "rejected": "No."},
    ]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    raw = recipe_dict(tiny_model_dir, tmp_path / "runs")
    raw["method"] = "dpo"
    raw["data"] = {"train_path": str(path), "max_length": 128}
    data = prepare_preference_data(validate_recipe(raw).data, tokenizer, 7)
    report = data.reports[0]
    assert (report.rows_read, report.rows_kept, len(data.train)) == (5, 2, 2)
    assert dict(report.dropped) == {
        "chosen and rejected are identical": 1,
        "empty chosen or rejected answer": 1,
        "longer than data.max_length": 1,
    }
    rows[0]["chosen"] = "A wrong done to someone."  # changed data: a resumed run would refuse it
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert prepare_preference_data(validate_recipe(raw).data, tokenizer, 7).fingerprint != data.fingerprint
    raw["data"]["on_bad_row"] = "error"
    with pytest.raises(UserError, match=r"pairs\.jsonl: row 3: chosen and rejected are identical"):
        prepare_preference_data(validate_recipe(raw).data, tokenizer, 7)

    # The prompt goes first, oldest turns first; answers are never cut. data.overlength decides the rest.
    history = [{"role": "user", "content": "Earlier? " * 60}, {"role": "assistant", "content": "Yes. " * 30}]
    system = {"role": "system", "content": "Be brief."}
    last = {"role": "user", "content": "What is a lien?"}
    long_rows = [
        {"prompt": [system, *history, last], "chosen": "A claim on property.", "rejected": "A tort."},
        {"prompt": "Long? " * 200, "chosen": "Yes.", "rejected": "No."},  # one user turn: cannot be cut
    ]
    path.write_text("\n".join(json.dumps(r) for r in long_rows) + "\n")
    raw["data"].update(on_bad_row="drop", overlength="truncate")
    data = prepare_preference_data(validate_recipe(raw).data, tokenizer, 7)
    assert data.train[0]["prompt"] == [system, last] and data.train[0]["chosen"][0]["content"] == "A claim on property."
    assert data.reports[0].truncated == 1
    assert dict(data.reports[0].dropped) == {"longer than data.max_length with the prompt cut": 1}
    raw["data"]["overlength"] = "error"
    with pytest.raises(UserError, match=r"train: row 1 is longer than data\.max_length 128"):
        prepare_preference_data(validate_recipe(raw).data, tokenizer, 7)


def test_prompt_turns_that_are_not_text_are_dropped_by_reason(tokenizer, tiny_model_dir, tmp_path):
    """A prompt turn whose content is null, a number or a list (or whose role no template knows) is dropped
    and counted, for pairs and KTO rows alike, instead of ending in the template's UndefinedError."""
    good = {"prompt": "What is a tort?", "chosen": "A civil wrong.", "rejected": "A contract."}
    bad_turns = [
        {"role": "user", "content": None},
        {"role": "user", "content": 42},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    rows = [good] + [{**good, "prompt": [{"role": "system", "content": "Hi."}, turn]} for turn in bad_turns]
    rows.append({**good, "prompt": [{"role": "narrator", "content": "Once."}, {"role": "user", "content": "q"}]})
    path = Path(write_jsonl(tmp_path / "pairs.jsonl", rows))
    raw = recipe_dict(tiny_model_dir, tmp_path / "runs")
    raw["method"] = "dpo"
    raw["data"] = {"train_path": str(path), "max_length": 128}
    report = prepare_preference_data(validate_recipe(raw).data, tokenizer, 7).reports[0]
    assert (report.rows_read, report.rows_kept) == (5, 1)
    assert dict(report.dropped) == {
        "the prompt has a turn whose content is not text": 3,
        "the prompt has a turn that is not system, user or assistant": 1,
    }
    kto = [
        {"prompt": "q", "completion": "a", "label": True},
        {"prompt": [bad_turns[0]], "completion": "a", "label": False},
    ]
    raw["data"]["train_path"] = write_jsonl(tmp_path / "kto.jsonl", kto)
    report = prepare_preference_data(validate_recipe(raw).data, tokenizer, 7, method="kto").reports[0]
    assert dict(report.dropped) == {"the prompt has a turn whose content is not text": 1}


REFUSED = [  # (method, recipe change, the key the one-line error names)
    ("kto", {"training": {"micro_batch_size": 1}}, "training.micro_batch_size"),
    ("dpo", {"lora": {"target_modules": ["q_proj", "lm_head"]}}, "lora.target_modules"),
    ("kto", {"lora": {"target_modules": ["lm_head"]}}, "lora.target_modules"),
    ("dpo", {"preference": {"loss_type": ["exo_pair"]}}, "preference.loss_type"),
]


@pytest.mark.parametrize(("method", "change", "key"), REFUSED, ids=[f"{m}-{k}" for m, _, k in REFUSED])
def test_settings_trl_refuses_are_refused_by_validate(tiny_model_dir, tmp_path, method, change, key):
    """Each setting a TRL trainer refuses in its constructor (after the run directory exists) is refused by
    `qlora-pipe validate` and `train` in one line, before any run folder; and TRL still refuses it (the
    recipe built without our check reaches the real trainer), so a rule TRL drops shows up here."""
    import yaml

    from qlora_pipe.recipe import load_recipe
    from qlora_pipe.training.stage import run_training
    from tests.test_bad_inputs import assert_one_line_error, cli

    raw = dpo_recipe(tiny_model_dir, tmp_path, max_steps=1, micro_batch_size=2)
    raw["method"] = method
    if method == "kto":
        rows = [{"prompt": f"Q{i}?", "completion": f"A{i}.", "label": i % 2 == 0} for i in range(8)]
        raw["data"].update(train_path=write_jsonl(tmp_path / "kto.jsonl", rows), eval_path=None)
    recipe = validate_recipe(raw)  # the same run without the refused setting is fine
    for section, values in change.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match=rf"/recipe\.yaml: recipe: {key}: [^\n]+$"):
        load_recipe(path)
    assert_one_line_error(cli("train", str(path)), key)
    assert not recipe.run_dir().exists()

    unchecked = recipe.model_copy(
        update={section: getattr(recipe, section).model_copy(update=values) for section, values in change.items()}
    )
    with pytest.raises(ValueError) as refused:  # TRL's own refusal, whatever its wording
        run_training(unchecked)
    assert "/trl/" in refused.traceback[-1].path.as_posix()


def test_hub_pairs_with_implicit_prompts_read_like_local_pairs(tokenizer, tiny_model_dir, tmp_path):
    """The Hub path (a local folder in a Hub dataset's layout, parquet, read by datasets.load_dataset) with the
    layout of many Hub preference sets: no prompt column, chosen and rejected as whole conversations, the
    shared turns being the prompt; columns renamed by the recipe. The pairs are the bundled local ones."""
    from datasets import Dataset

    local = [json.loads(line) for line in PAIRS_TRAIN.read_text().splitlines()[:12]]

    def conversation(row, answer):
        return row["prompt"] + [{"role": "assistant", "content": row[answer]}]  # system + user + answer

    hub_rows = [{"good": conversation(r, "chosen"), "bad": conversation(r, "rejected"), "score": 1.0} for r in local]
    folder = tmp_path / "hub-prefs"
    (folder / "data").mkdir(parents=True)
    Dataset.from_list(hub_rows).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    raw = recipe_dict(tiny_model_dir, tmp_path / "runs")
    raw["method"] = "dpo"
    raw["data"] = {"sources": [{"hub": str(folder), "columns": {"chosen": "good", "rejected": "bad"}}]}
    from_hub = prepare_preference_data(validate_recipe(raw).data, tokenizer, 7)
    raw["data"] = {"train_path": str(PAIRS_TRAIN), "max_train_samples": 12}
    from_file = prepare_preference_data(validate_recipe(raw).data, tokenizer, 7)
    key = lambda pair: json.dumps([pair["prompt"], pair["chosen"], pair["rejected"]])  # noqa: E731
    assert sorted(map(key, from_hub.train)) == sorted(map(key, from_file.train)) and len(from_hub.train) == 12
    assert from_hub.reports[0].rows_read == 12 and not from_hub.reports[0].dropped


def test_dpo_run_moves_the_preference_it_trains_on_and_exports_faithfully(tiny_model_dir, tmp_path):
    """A real DPO run (TRL's DPOTrainer, 4-bit base, LoRA). The pairs scored are the 16 it trains on: on the
    random tiny model this checks that DPO raises chosen over rejected; held-out numbers come from the
    quickstart (README)."""
    from qlora_pipe.export.command import export_merged
    from qlora_pipe.training.stage import run_training

    raw = dpo_recipe(tiny_model_dir, tmp_path, max_steps=40, learning_rate=5e-3, eval_steps=None)
    result = run_training(validate_recipe(raw))
    summary = result.summary
    assert summary["method"] == "dpo" and summary["preference"]["beta"] == 0.1
    scores = summary["held_out_reward_accuracy"]
    before, after = scores["before"], scores["after"]
    assert before["pairs"] == after["pairs"] == 16
    # The margin this test states: chosen over rejected by at least 5 more nats on average, and no pair
    # share lost. (On this random model length decides most pairs before training: DPO raises the margin
    # relative to the reference, so a pair the reference ranks far the wrong way can stay so.)
    assert after["mean_margin"] >= before["mean_margin"] + 5
    assert after["reward_accuracy"] >= before["reward_accuracy"]
    rows = [json.loads(line) for line in result.run_dir.metrics.read_text().splitlines()]
    assert any("rewards/accuracies" in row for row in rows)  # TRL's DPO metrics reach metrics.jsonl
    exported = export_merged(result.run_dir.root)
    assert exported.fidelity["passed"] and exported.fidelity["examples"] == 16
    # `qlora-pipe eval` of a preference run: reward accuracy of the base and the tuned adapter on the pairs.
    from qlora_pipe.cli import main
    from qlora_pipe.publish.model_card import adapter_card
    from qlora_pipe.recipe import load_recipe

    assert main(["eval", str(result.run_dir.root)]) == 0
    report = json.loads(result.run_dir.eval_report.read_text())
    assert set(report["columns"]) == {"base", "dpo"} and report["columns"]["dpo"] == after
    card = adapter_card(result.run_dir, load_recipe(result.run_dir.resolved_recipe), "me/dpo")
    assert "Method: DPO" in card and "held-out reward accuracy after training" in card and "dpo" in card


def test_dpo_resume_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path):
    from qlora_pipe.runs import RunDir
    from qlora_pipe.training.stage import run_training
    from tests.test_resume import CrashAtStep, SimulatedCrash, losses

    def recipe(name: str):
        raw = dpo_recipe(tiny_model_dir, tmp_path, name, max_steps=6, save_steps=3, eval_steps=None)
        raw["quantization"] = {"compute_dtype": "float32"}
        raw["training"]["precision"] = "fp32"
        return validate_recipe(raw)

    straight = run_training(recipe("straight"))
    with pytest.raises(SimulatedCrash):
        run_training(recipe("crashed"), callbacks=(CrashAtStep(5),))
    resumed = run_training(recipe("crashed"), resume=True)
    assert [s for s, _ in losses(resumed.run_dir)] == list(range(1, 7))
    assert losses(resumed.run_dir) == losses(straight.run_dir)  # fp32: bit for bit
    assert RunDir(resumed.run_dir.root).is_finished()


def test_dpo_continues_an_sft_adapter_on_its_own_base(make_recipe, tiny_model_dir, tmp_path):
    from qlora_pipe.training.method import starting_adapter
    from qlora_pipe.training.stage import run_training

    sft = run_training(make_recipe(max_steps=2))
    raw = dpo_recipe(tiny_model_dir, tmp_path, "continued", max_steps=2, eval_steps=None)
    raw["model"]["adapter"] = str(sft.run_dir.root)
    raw["lora"]["r"] = 4  # ignored: the continued adapter keeps its own rank
    result = run_training(validate_recipe(raw))
    assert result.summary["trainable_params"] == sft.summary["trainable_params"]
    assert result.summary["started_from_adapter"] == str(sft.run_dir.root)
    from qlora_pipe.cli import main

    assert main(["eval", str(result.run_dir.root), "--limit", "4"]) == 0  # base, the SFT adapter, the DPO one
    assert set(json.loads(result.run_dir.eval_report.read_text())["columns"]) == {"base", "sft", "dpo"}
    raw["model"]["name_or_path"] = str(tmp_path)  # another base
    with pytest.raises(UserError, match=r"model\.adapter: .* was trained on .*, not on model\.name_or_path"):
        starting_adapter(validate_recipe(raw))
    raw["model"]["adapter"] = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"model\.adapter: .*nowhere does not exist"):
        starting_adapter(validate_recipe(raw))

    # The SFT run deleted: eval scores what it can (base and the DPO adapter) and says what is missing.
    shutil.rmtree(sft.run_dir.root)
    assert main(["eval", str(result.run_dir.root), "--limit", "4"]) == 0
    report = json.loads(result.run_dir.eval_report.read_text())
    assert set(report["columns"]) == {"base", "dpo"}
    assert "adapter_config.json is missing" in report["left_out"]["sft"]


def damaged_runs(run: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Copies of a finished run, each damaged one way a user meets: (folder, what the refusal names)."""
    from tests.test_bad_inputs import truncate

    cases = {
        "no weights": (lambda r: (r / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
        "truncated weights": (lambda r: truncate(r / "adapter_model.safetensors"), "adapter_model.safetensors"),
        "unfinished": (lambda r: (r / "summary.json").unlink(), "is not a finished run"),
    }
    out = {}
    for name, (damage, expected) in cases.items():
        copy = tmp_path / name.replace(" ", "-")
        shutil.copytree(run, copy)
        damage(copy)
        out[name] = copy, expected
    return out


def test_model_adapter_refuses_what_export_refuses(make_recipe, tiny_model_dir, tmp_path):
    """model.adapter naming a run export, eval and chat would refuse (adapter missing or truncated, the run
    unfinished) or a classifier's run is refused in one line before any model loads; `train` exits 2."""
    from qlora_pipe.training.method import starting_adapter
    from qlora_pipe.training.stage import run_training
    from tests.test_bad_inputs import assert_one_line_error, cli
    from tests.test_classification import classifier_recipe

    sft = run_training(make_recipe(max_steps=1))
    raw = dpo_recipe(tiny_model_dir, tmp_path, "continued", max_steps=1)
    raw["model"]["adapter"] = str(sft.run_dir.root)
    assert starting_adapter(validate_recipe(raw)) == sft.run_dir.root
    for name, (folder, expected) in damaged_runs(sft.run_dir.root, tmp_path).items():
        raw["model"]["adapter"] = str(folder)
        with pytest.raises(UserError, match=rf"^model\.adapter: .*{re.escape(expected)}[^\n]*$"):
            starting_adapter(validate_recipe(raw))
        if name == "truncated weights":  # the whole command: one line, exit 2, no run folder
            import yaml

            (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(raw))
            assert_one_line_error(cli("train", str(tmp_path / "dpo.yaml")), "model.adapter", expected)
            assert not (tmp_path / "runs" / "continued").exists()

    (tmp_path / "cls").mkdir()
    classifier = run_training(classifier_recipe(tiny_model_dir, tmp_path / "cls", "classifier", max_steps=1))
    raw["model"]["adapter"] = str(classifier.run_dir.root)
    with pytest.raises(UserError, match=r"holds a classifier's adapter; method dpo continues a text-generation"):
        starting_adapter(validate_recipe(raw))


def test_orpo_trains_on_pairs_without_a_reference(tiny_model_dir, tmp_path):
    """ORPO (TRL's experimental ORPOTrainer): the same pairs, no reference model; the planner counts the
    chosen + rejected batch and no reference adapter."""
    from qlora_pipe.plan.advice import plan_for_recipe
    from qlora_pipe.training.stage import run_training

    raw = dpo_recipe(tiny_model_dir, tmp_path, "orpo", max_steps=6, eval_steps=None)
    raw["method"] = "orpo"
    recipe = validate_recipe(raw)
    result = run_training(recipe)
    assert result.summary["method"] == "orpo" and result.summary["steps"] == 6
    assert result.summary["supervised_tokens"] > 0  # ORPO's own batch layout is counted too
    scores = result.summary["held_out_reward_accuracy"]
    assert scores["before"]["pairs"] == scores["after"]["pairs"] == 16
    rows = [json.loads(line) for line in result.run_dir.metrics.read_text().splitlines()]
    assert all(math.isfinite(row["loss"]) for row in rows if "loss" in row)
    names = [name for name, _ in plan_for_recipe(recipe, micro_batch_size=2, max_length=64).terms]
    assert "reference adapter (DPO)" not in names


def test_kto_trains_on_unpaired_rows_and_refuses_mixed_data(tiny_model_dir, tokenizer, tmp_path):
    """KTO (TRL's KTOTrainer): prompt / completion / label rows, desirable or not; the reference is the
    adapter's frozen copy as for DPO."""
    from qlora_pipe.training.stage import run_training

    rows = []
    for line in PAIRS_TRAIN.read_text().splitlines()[:16]:
        pair = json.loads(line)
        rows += [
            {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
            {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False},
        ]
    rows.append({"prompt": "q", "completion": "a", "label": "yes"})  # dropped: not a boolean label
    path = tmp_path / "kto.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    raw = dpo_recipe(tiny_model_dir, tmp_path, "kto", max_steps=12, learning_rate=5e-3, eval_steps=None)
    raw["method"] = "kto"
    raw["data"].update(train_path=str(path), eval_path=str(path), max_train_samples=None, max_eval_samples=None)
    result = run_training(validate_recipe(raw))
    assert result.summary["method"] == "kto" and result.summary["steps"] == 12
    report = json.loads(result.run_dir.data_report.read_text())[0]
    assert report["rows_kept"] == 32 and report["dropped"] == {"label is not true or false": 1}
    # unpaired rows have no rejected twin: scored by label separation (desirable vs undesirable log-prob)
    scores = result.summary["held_out_label_separation"]
    before, after = scores["before"], scores["after"]
    assert (before["rows"], before["desirable"], before["undesirable"]) == (32, 16, 16)
    gap = lambda s: s["desirable_logprob"] - s["undesirable_logprob"]  # noqa: E731
    # measured here: gap 0.00003 -> 0.0148 nats per token, AUC 0.527 -> 0.609 (most tokens are shared)
    assert gap(after) > gap(before) + 0.005 and after["label_auc"] > before["label_auc"]
    from qlora_pipe.evaluate.preference_eval import preference_table, run_preference_eval

    table = preference_table(run_preference_eval(result.run_dir, validate_recipe(raw), None, None))
    assert "label AUC" in table and "kto" in table.splitlines()[1]
    metrics = [json.loads(line) for line in result.run_dir.metrics.read_text().splitlines()]
    assert all(math.isfinite(row["loss"]) for row in metrics if "loss" in row)
    from qlora_pipe.export.command import export_merged

    assert export_merged(result.run_dir.root).fidelity["passed"]  # scored on prompt + completion rows
    raw["data"]["eval_path"] = str(PAIRS_TRAIN)  # pairs beside unpaired rows
    with pytest.raises(UserError, match="mixes KTO rows"):
        prepare_preference_data(validate_recipe(raw).data, tokenizer, 7, "kto")


def test_dpo_step_peak_matches_the_plan(tiny_model_dir, tmp_path):
    """One whole DPO step through TRL's loss (policy on chosen + rejected, reference forward with the frozen
    adapter copy, backward), measured with the profiler's memory timeline as for SFT (tests/test_plan.py),
    beside the planner's activations + transient peak + gradients at the batch's own size. In fp32 on this
    tiny model the fused LM head's tile dominates; measured here: 0.90 of the profiled peak."""
    from qlora_pipe.model import load_tokenizer
    from qlora_pipe.plan.advice import plan_for_recipe
    from qlora_pipe.runs import RunDir
    from qlora_pipe.training.method import load_policy, prepare_method_data
    from qlora_pipe.training.micro_batch import BatchChoice
    from qlora_pipe.training.stage import build_trainer
    from tests.test_plan import _step_peak

    raw = dpo_recipe(tiny_model_dir, tmp_path, "measure", max_steps=2, eval_steps=None, optimizer="adamw_torch")
    raw["quantization"] = {"compute_dtype": "float32"}
    raw["training"]["precision"] = "fp32"
    raw["lora"]["dropout"] = 0.0
    raw["data"]["eval_path"] = None
    recipe = validate_recipe(raw)
    tokenizer = load_tokenizer(recipe)
    data = prepare_method_data(recipe, tokenizer)
    model = load_policy(recipe, tokenizer).model
    run = RunDir(recipe.run_dir())
    run.root.mkdir(parents=True)
    trainer = build_trainer(recipe, run, model, tokenizer, data, (), BatchChoice(4, 1))
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model.train()

    def step():
        trainer.compute_loss(model, batch).backward()

    step()  # gradients allocated once
    model.zero_grad(set_to_none=True)
    measured = _step_peak(step)
    rows, length = batch["input_ids"].shape
    assert rows == 8  # chosen and rejected of 4 pairs in one batch
    plan = plan_for_recipe(recipe, micro_batch_size=rows // 2, max_length=length)
    predicted = plan.term("activations kept") + plan.term("transient peak") + plan.term("LoRA gradients")
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)
