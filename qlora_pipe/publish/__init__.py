"""The publish stage: a run's adapter and/or merged model, with a model card, to the Hugging Face Hub.

push_run(run_dir, repo_id, what, private) hub.py (`qlora-pipe push`: allow-listed staging, preflight, upload)
model_card.py  the model cards, from the run's own files
"""

from qlora_pipe.lazy import lazy_api

__getattr__ = lazy_api(__name__, {"push_run": "hub"})
__all__ = ["push_run"]
