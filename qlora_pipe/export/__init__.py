"""The export stage: a finished run's adapter merged into its base, written and verified.

export_merged(run_dir, out, ...) -> ExportResult   command.py (`qlora-pipe export`)
merge.py       the merge maths: NF4 round trip, LoRA/DoRA deltas in fp32, the streaming shard writer
fidelity.py    the merged model against the trained model on held-out examples
"""

from qlora_pipe.lazy import lazy_api

__getattr__ = lazy_api(__name__, {"export_merged": "command", "ExportResult": "command"})
__all__ = ["ExportResult", "export_merged"]
