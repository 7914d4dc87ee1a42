"""The training stage: recipe -> SFTConfig -> SFTTrainer -> adapter and summary in the run directory.

run_training(recipe, overwrite, resume, callbacks) -> TrainResult   stage.py (reads as its list of stages)
trainer.py          SFTTrainer + supervised-token count, bad-step skipping, checkpoint markers, rotation
checkpoints.py      completion markers, integrity checks, the latest valid checkpoint
resume.py           which checkpoint, and whether the recipe still describes the same training
micro_batch.py      training.micro_batch_size: auto (OOM back-off)
speed_switches.py   what each speed and memory switch needs, checked before anything loads
signals.py progress.py plots.py   Ctrl-C/SIGTERM at step boundaries; the progress bar; loss.png
"""

from qlora_pipe.lazy import lazy_api

__getattr__ = lazy_api(__name__, {"run_training": "stage", "TrainResult": "stage"})
__all__ = ["TrainResult", "run_training"]
