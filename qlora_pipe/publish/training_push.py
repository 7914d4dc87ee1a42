"""What a recipe's hub section asks of a training run: each checkpoint pushed as it is saved, the adapter
pushed once the run has finished. The caller of the training stage (the CLI, ``qlora_pipe.train``) hands it
over, so that training never imports the publish stage."""

from __future__ import annotations

import logging

from qlora_pipe.errors import UserError

log = logging.getLogger(__name__)


class HubPush:
    def __init__(self, hub) -> None:
        self.hub = hub  # the recipe's hub section

    def checkpoint_callbacks(self) -> tuple:
        """Callbacks for the trainer (the first process only: one upload per checkpoint)."""
        from qlora_pipe.machine.dist import is_main_process

        if not (self.hub.push_checkpoints and is_main_process()):
            return ()
        from qlora_pipe.publish.hub import CheckpointPusher
        from qlora_pipe.training.callbacks import PushCheckpoints

        return (PushCheckpoints(CheckpointPusher(self.hub.repo_id, self.hub.private)),)

    def at_end(self, run) -> None:
        """After the run finished. A failed push never un-finishes the run: it says how to retry."""
        if not self.hub.push_adapter_at_end:
            return
        from qlora_pipe.publish.hub import push_run

        try:
            push_run(run.root, self.hub.repo_id, "adapter", private=self.hub.private)
        except UserError as exc:
            log.error("the run finished, but %s", exc)
