"""Answer scores on hand-made pairs whose scores are worked out by hand in the comments."""

from __future__ import annotations

import pytest

from qlora_pipe.evaluate.metrics import eval_table, score_answers
from qlora_pipe.rewards.answer_match import exact_match, lcs_length, normalize, rouge_l, token_f1


def test_normalize_lowercases_and_drops_punctuation_articles_and_extra_space():
    assert normalize("  The Cat,  sat on   A mat!  ") == "cat sat on mat"
    assert normalize("An apple; the end.") == "apple end"
    assert normalize("theory another") == "theory another"  # articles only as whole words
    assert normalize("") == "" and normalize(" .,! ") == ""


def test_exact_match_after_normalization():
    assert exact_match("The answer is yes.", "answer is YES") == 1.0
    assert exact_match("Yes", "No") == 0.0
    assert exact_match("", "") == 1.0
    assert exact_match("", "yes") == 0.0
    assert exact_match("the", "") == 1.0  # both normalize to nothing


def test_token_f1_counts_overlap_as_a_bag_of_words():
    # prediction "cat sat" vs reference "cat sat on mat": overlap 2, P = 2/2, R = 2/4, F1 = 2*1*0.5/1.5 = 2/3
    assert token_f1("The cat sat.", "the cat sat on the mat") == pytest.approx(2 / 3)
    # repeated tokens count at most as often as in the reference: "yes yes yes" vs "yes no":
    # overlap 1, P = 1/3, R = 1/2, F1 = 2*(1/3)*(1/2)/(5/6) = 0.4
    assert token_f1("yes yes yes", "yes no") == pytest.approx(0.4)
    assert token_f1("red", "blue") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0 and token_f1("x", "") == 0.0
    assert token_f1("A court order!", "court order") == 1.0


def test_rouge_l_uses_the_longest_common_subsequence_in_order():
    assert lcs_length(["a", "b", "c", "d"], ["a", "c", "d", "b"]) == 3  # a c d
    assert lcs_length([], ["a"]) == 0
    # "police killed gunman" vs "police kill gunman": LCS "police gunman" = 2, P = R = 2/3, F = 2/3
    assert rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(2 / 3)
    # order matters for ROUGE-L but not for F1: "mat sat cat" vs "cat sat mat": LCS 1 ("sat"), F = 1/3
    assert rouge_l("mat sat cat", "cat sat mat") == pytest.approx(1 / 3)
    assert token_f1("mat sat cat", "cat sat mat") == 1.0
    # prediction 2 tokens, reference 4 tokens, LCS 2: P = 1, R = 1/2, F = 2/3
    assert rouge_l("court order", "a court issued an order today") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert rouge_l("", "") == 1.0 and rouge_l("", "x") == 0.0 and rouge_l("The.", "a!") == 1.0


def test_score_answers_averages_over_pairs_and_tables_both_columns():
    scores = score_answers(["yes", "the cat sat", ""], ["Yes.", "cat sat on mat", "no"])
    # EM: 1, 0, 0 -> 1/3; F1: 1, 2/3, 0 -> 5/9; ROUGE-L: 1, 2/3 (LCS 2, P 1, R 1/2), 0 -> 5/9
    assert scores == pytest.approx({"exact_match": 1 / 3, "token_f1": 5 / 9, "rouge_l": 5 / 9})
    assert score_answers([], []) == {"exact_match": 0.0, "token_f1": 0.0, "rouge_l": 0.0}
    with pytest.raises(ValueError):
        score_answers(["a"], [])
    column = {"loss": 2.0, "perplexity": 7.389, "stopped_at_end_of_turn": 1.0, "mean_answer_tokens": 3.0, **scores}
    table = eval_table({"base": column, "tuned": column})
    assert "exact match" in table and "33.3%" in table and "2.0000" in table
    markdown = eval_table({"base": column, "tuned": column}, markdown=True)
    assert markdown.startswith("| metric | base | tuned |") and "| ROUGE-L | 55.6% | 55.6% |" in markdown


def test_lm_eval_table_and_task_names():
    from qlora_pipe.errors import UserError
    from qlora_pipe.evaluate.lm_harness import lm_eval_table, parse_tasks

    table = lm_eval_table({"arc_easy": {"acc,none": 0.25, "acc_norm,none": 0.3}}, {"arc_easy": {"acc,none": 0.5}})
    assert "arc_easy acc,none" in table and "0.2500" in table and "0.5000" in table
    assert table.splitlines()[-1].split()[-2:] == ["0.3000", "-"]  # a metric only the base reported
    with pytest.raises(UserError, match="task names"):
        parse_tasks(" , ")


def test_lm_eval_task_names_are_checked_before_any_model_loads(tmp_path):
    import importlib.util

    from qlora_pipe.errors import UserError
    from qlora_pipe.evaluate.lm_harness import metrics_only, parse_tasks

    with pytest.raises(UserError, match=r"--lm-eval-include .*: not a folder of lm-eval task files"):
        parse_tasks("arc_easy", include=str(tmp_path / "missing"))
    scores = {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1, "samples": 10, "acc_norm,none": 0.25}
    assert metrics_only(scores) == {"acc,none": 0.5, "acc_norm,none": 0.25}  # the table lists metrics only
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval is not installed here (it changes the stack's versions: its own venv, see the docs)")
    with pytest.raises(UserError, match=r"lm-eval has no task arc_easyy \(close: arc_easy"):
        parse_tasks("arc_easyy,hellaswag")
    assert parse_tasks("arc_easy, hellaswag") == ["arc_easy", "hellaswag"]
