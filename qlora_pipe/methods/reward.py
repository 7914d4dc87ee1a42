"""A reward model (``method: reward``): a scalar head on the 4-bit base with LoRA, trained by TRL's RewardTrainer
on preference pairs to score the chosen answer above the rejected one (the Bradley-Terry loss,
-log sigmoid(r_chosen - r_rejected)).

The model is the base as a sequence classifier with one output (transformers' AutoModelForSequenceClassification,
``num_labels=1``): its head is created at load (seeded by the recipe), kept out of 4-bit and trained in full
beside the adapter, as for ``task: classification``. Each pair's sequences are the prompt followed by the chosen
or the rejected answer, rendered with the run's chat template exactly as TRL renders them for training; the
reward is the head's output at the last token. Held out: the share of pairs scored the right way round and the
mean margin, before training (the base with its untrained head) and after. The export writes a merged sequence
classifier that plain transformers loads, checked against the trained model on the held-out pairs.
"""

from __future__ import annotations

import json
import time

from qlora_pipe.methods.base import Method
from qlora_pipe.models.classifier import HEADS

REWARD_EVAL = "reward_eval.json"
OUTPUTS = ["reward"]  # the head's one output


def _sequences(tokenizer, pairs) -> list[dict[str, list[int]]]:
    """Every pair's prompt + chosen answer, then every pair's prompt + rejected answer (TRL's rendering)."""

    def ids(messages) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    chosen = [{"input_ids": ids(pair["prompt"] + pair["chosen"])} for pair in pairs]
    return chosen + [{"input_ids": ids(pair["prompt"] + pair["rejected"])} for pair in pairs]


def pair_rewards(model, tokenizer, pairs):
    """The rewards of the chosen and of the rejected answers (two fp32 tensors, one value per pair)."""
    from qlora_pipe.evaluate.reward_accuracy import evaluating
    from qlora_pipe.models.classifier import predict

    with evaluating(model):
        _, scores = predict(model, _sequences(tokenizer, pairs), batch_size=8)
    return scores[: len(pairs), 0], scores[len(pairs) :, 0]


def pairwise_scores(chosen, rejected) -> dict:
    """Share of pairs with the chosen answer scored higher, the mean margin and the mean pairwise loss."""
    import torch

    margin = chosen - rejected
    if not len(margin):
        return {"pairs": 0, "pairwise_accuracy": 0.0, "mean_margin": 0.0, "pairwise_loss": 0.0}
    return {
        "pairs": len(margin),
        "pairwise_accuracy": float((margin > 0).float().mean()),
        "mean_margin": float(margin.mean()),
        "pairwise_loss": float(-torch.nn.functional.logsigmoid(margin).mean()),
    }


def _table(result: dict) -> str:
    names, columns = list(result["columns"]), list(result["columns"].values())
    return "\n".join(
        [
            f"{columns[0]['pairs']} {result['data']}; tuned: {result['tuned_model']}",
            f"{'':28}" + "".join(f"{name:>24}" for name in names),
            f"{'pairwise accuracy':28}" + "".join(f"{100 * c['pairwise_accuracy']:>23.1f}%" for c in columns),
            f"{'mean margin (reward)':28}" + "".join(f"{c['mean_margin']:>24.3f}" for c in columns),
            f"{'pairwise loss':28}" + "".join(f"{c['pairwise_loss']:>24.4f}" for c in columns),
        ]
    )


class Reward(Method):
    auto_class = "AutoModelForSequenceClassification"
    kept_unquantized = HEADS  # the head trains in 16-bit
    serves_chat = False
    reads_own_check_rows = True
    verified_block_by_block = False  # loaded whole, with its head

    def refusal(self, what: str, run) -> str | None:
        return {
            "chat": f"chat: {run.root} is a reward model (method: reward); score pairs with qlora-pipe eval",
            "export --unmerged": "export --unmerged: a reward model is exported merged (its head is trained "
            "whole); leave it out",
            "export --format gguf": "export --format gguf: llama.cpp serves language models, not a reward model's "
            "scalar head; the merged transformers folder is the export (leave out --format)",
        }.get(what)

    def plan_settings(self, recipe) -> dict:
        return {"sequences_per_row": 2}  # chosen and rejected go through the model together

    def plan_note(self) -> str | None:
        return (
            "method reward: planned as a causal LM of the same base on chosen + rejected rows; a reward head\n"
            "and its loss are smaller than the LM head's chunked loss, so its peak is at or below this plan."
        )

    def prepare_data(self, recipe, tokenizer):
        from qlora_pipe.data.preference import prepare_preference_data

        return prepare_preference_data(recipe.data, tokenizer, recipe.seed, self.name)

    def preview(self, recipe, tokenizer, rows: int, color: bool) -> str:
        from qlora_pipe.data.preview import preference_preview_text

        return preference_preview_text(self.prepare_data(recipe, tokenizer), tokenizer, rows)

    def trainer_class(self, recipe) -> type:
        from trl import RewardTrainer

        from qlora_pipe.compat.transformers import TrainerInternals
        from qlora_pipe.training.trainer import RunGuarantees

        class PipeRewardTrainer(TrainerInternals, RunGuarantees, RewardTrainer):
            def compute_loss(self, model, inputs, *args, **kwargs):
                if model.training:  # one score trained per sequence, as a classifier's one label per row
                    self.supervised_tokens += int(inputs["input_ids"].shape[0])
                return super().compute_loss(model, inputs, *args, **kwargs)

        return PipeRewardTrainer

    def trainer_config(self, recipe, arguments: dict):
        """TRL's RewardConfig: the shared arguments it has, the data's max_length, dropout as the recipe sets it."""
        import dataclasses

        from trl import RewardConfig

        accepted = {f.name for f in dataclasses.fields(RewardConfig)}
        own = {
            "max_length": recipe.data.max_length,
            "center_rewards_coefficient": recipe.reward.center_rewards_coefficient,
            "disable_dropout": False,  # lora.dropout applies
        }
        shared = {k: v for k, v in arguments.items() if k in accepted and k not in ("packing", "padding_free")}
        return RewardConfig(**{**shared, **own})

    def load_fresh_policy(self, recipe, tokenizer):
        from qlora_pipe.models.classifier import load_classifier

        return load_classifier(recipe, tokenizer, OUTPUTS)

    def callbacks(self, recipe, run, tokenizer, data) -> list:
        if data.eval is None:
            return []
        from qlora_pipe.training.callbacks import HeldOutBeforeAfter

        pairs = [data.eval[i] for i in range(len(data.eval))]
        measure = lambda model: pairwise_scores(*pair_rewards(model, tokenizer, pairs))  # noqa: E731
        return [HeldOutBeforeAfter(run.root / REWARD_EVAL, measure)]

    def held_out_eval(self, run, recipe, data, limit, batch_size: int, merged: bool, lm_eval: bool) -> dict:
        """Pairwise accuracy of the base with its untrained head (the adapter disabled) and of the reward model
        (with --merged: the exported model loaded by plain transformers)."""
        from qlora_pipe.errors import UserError
        from qlora_pipe.evaluate.preference_eval import pairs_for
        from qlora_pipe.models.classifier import load_trained_classifier
        from qlora_pipe.models.loading import load_run_tokenizer
        from qlora_pipe.runs import write_json_atomic

        if lm_eval:
            raise UserError(f"eval {run.root}: --lm-eval is for text generation; a reward model is scored on pairs")
        started = time.time()
        tokenizer = load_run_tokenizer(run.root)
        pairs, source = pairs_for(recipe, tokenizer, data, limit)
        if not pairs:
            raise UserError(f"eval {run.root}: no usable pairs in {source}")
        model = load_trained_classifier(recipe, run.root, tokenizer, OUTPUTS)
        with model.disable_adapter():
            columns = {"base (untrained head)": pairwise_scores(*pair_rewards(model, tokenizer, pairs))}
        if merged:
            from transformers import AutoModelForSequenceClassification

            del model
            model = AutoModelForSequenceClassification.from_pretrained(run.root / "merged").eval()
        columns["reward model"] = pairwise_scores(*pair_rewards(model, tokenizer, pairs))
        tuned = "merged model" if merged else "4-bit base + adapter"
        result = {"run": str(run.root), "method": self.name, "data": source, "columns": columns, "tuned_model": tuned}
        out = (run.root / "merged" / run.eval_report.name) if merged else run.eval_report
        write_json_atomic(out, result)
        return {**result, "path": str(out), "seconds": time.time() - started}

    def eval_table(self, result: dict, markdown: bool = False) -> str:
        return f"```\n{_table(result)}\n```" if markdown else _table(result)

    def summary(self, recipe, run) -> dict:
        path = run.root / REWARD_EVAL
        scores = json.loads(path.read_text()) if path.is_file() else {}
        return {"method": self.name, "reward": recipe.reward.model_dump(), "held_out_pairwise_accuracy": scores}

    def unused_base_tensors(self, base, shards, recipe) -> set[str]:
        from qlora_pipe.export.classifier_export import unused_base_tensors

        return unused_base_tensors(base, shards, recipe, OUTPUTS)

    def write_export_config(self, folder, recipe, tokenizer) -> None:
        from qlora_pipe.export.classifier_export import write_classifier_config

        write_classifier_config(folder, OUTPUTS, tokenizer.pad_token_id)

    def check_merged(self, recipe, run, merged_dir, dtype, limit: int = 64) -> dict:
        """The rewards of the trained and the merged model on the held-out pairs (or the training pairs): the
        export's criteria applied to the pairwise loss and to the rewards; agreement on each pair's order."""
        import torch
        from transformers import AutoModelForSequenceClassification

        from qlora_pipe.evaluate.preference_eval import pairs_for
        from qlora_pipe.export.verdict import judge
        from qlora_pipe.machine.hardware import dtype_for_inference
        from qlora_pipe.models.classifier import load_trained_classifier
        from qlora_pipe.models.loading import load_run_tokenizer, training_device

        tokenizer = load_run_tokenizer(run.root)
        pairs, source = pairs_for(recipe, tokenizer, None, limit)
        trained = load_trained_classifier(recipe, run.root, tokenizer, OUTPUTS)
        before = torch.cat(pair_rewards(trained, tokenizer, pairs))
        del trained
        served = getattr(torch, dtype_for_inference(str(dtype).removeprefix("torch.")))
        merged = AutoModelForSequenceClassification.from_pretrained(
            merged_dir, dtype=served, device_map={"": training_device()}
        ).eval()
        after = torch.cat(pair_rewards(merged, tokenizer, pairs))
        del merged
        n = len(pairs)
        trained_scores, merged_scores = pairwise_scores(before[:n], before[n:]), pairwise_scores(after[:n], after[n:])
        diff = (before - after).abs()
        agree = ((before[:n] > before[n:]) == (after[:n] > after[n:])).float().mean()
        result = {
            "examples": n,
            "trained_tokens_compared": 2 * n,  # one reward per sequence
            "max_abs_logit_diff": diff.max().item(),
            "mean_abs_logit_diff": diff.mean().item(),
            "mean_abs_logit": before.abs().mean().item(),
            "top1_agreement": agree.item(),  # pairs ordered the same way by both
            "eval_loss_trained": trained_scores["pairwise_loss"],
            "eval_loss_merged": merged_scores["pairwise_loss"],
            "split": source.split()[0],  # held-out or training
        }
        loss = result["eval_loss_trained"]
        result["relative_loss_change"] = abs(result["eval_loss_merged"] - loss) / max(abs(loss), 1e-9)
        result["relative_logit_diff"] = result["mean_abs_logit_diff"] / max(result["mean_abs_logit"], 1e-9)
        return judge(result, None)

    def card_line(self, recipe, sources: str) -> str:
        return (
            f"- Method: reward model (a scalar head trained with TRL's RewardTrainer) on preference pairs ({sources}); "
            f"max length {recipe.data.max_length}"
        )

    def card_load_arguments(self, recipe) -> str:
        return "    num_labels=1,\n"
