"""A callback for tests that kills the training process abruptly, as a node failure would."""

import os
import signal as signal_module

import lightning as L


class CrashAtStep(L.Callback):
    """Ends the process with no cleanup once ``step`` optimizer steps are done."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step >= self.step:
            os._exit(9)


class SignalAtStep(L.Callback):
    """Sends ``signal`` (a name such as ``SIGTERM``) to this process once ``step`` optimizer steps are
    done, as ``kill``, a scheduler's time limit or Ctrl+C would."""

    def __init__(self, step: int, signal: str):
        self.step, self.signal = step, signal
        if signal == "SIGINT" and signal_module.getsignal(signal_module.SIGINT) == signal_module.SIG_IGN:
            # started in the background by a shell without job control (a CI script run with &): SIGINT
            # is ignored from the start, and Python then leaves it so; a terminal's Ctrl+C is not
            signal_module.signal(signal_module.SIGINT, signal_module.default_int_handler)

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal_module, self.signal))


class KillAtPredictBatch(L.Callback):
    """SIGKILLs this process, as the OOM killer or a lost node would, once ``batch`` batches of a predict
    run (embed.py's) are embedded."""

    def __init__(self, batch: int):
        self.batch, self.seen = batch, 0

    def on_predict_batch_end(self, *args) -> None:
        self.seen += 1
        if self.seen >= self.batch:
            os.kill(os.getpid(), signal_module.SIGKILL)
