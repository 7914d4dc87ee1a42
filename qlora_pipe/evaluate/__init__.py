"""The evaluate stage: base vs tuned on held-out questions, and chat with the trained model.

run_eval(run_dir, ...)      evaluation.py (`qlora-pipe eval`: loss and generated-answer scores)
run_chat(path, ...)         chat.py (`qlora-pipe chat`: streamed, with the training chat template)
metrics.py                  exact match, token F1, ROUGE-L
lm_harness.py               `--lm-eval`: hand the models to lm-evaluation-harness
"""

from qlora_pipe.lazy import lazy_api

__getattr__ = lazy_api(__name__, {"run_eval": "evaluation", "run_chat": "chat"})
__all__ = ["run_chat", "run_eval"]
