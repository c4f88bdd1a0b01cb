"""A callback for tests that kills the training process abruptly, as a node failure would."""

import os

import lightning as L


class CrashAtStep(L.Callback):
    """Ends the process with no cleanup once ``step`` optimizer steps are done."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step >= self.step:
            os._exit(9)
