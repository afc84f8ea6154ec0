"""Run by tests/test_concurrency.py under `accelerate launch`: train a YAML config through the CLI's error
handling. With DEAD_RANK/DEAD_STEP set, that rank kills (SIGKILL) or freezes (SIGSTOP, DEAD_SIGNAL) itself
after step DEAD_STEP, as a machine that dies or stalls would, first writing its pid and the time to
DEAD_FILE, so the test can watch what the other process does and clean up a frozen one."""

import os
import signal
import sys
import time

from peftkit import Config, Trainer
from peftkit.callbacks import Callback
from peftkit.cli import guarded


class DieAt(Callback):
    def on_step_end(self, trainer, record):
        if trainer.accelerator.process_index == int(os.environ["DEAD_RANK"]) and record.step == int(
            os.environ["DEAD_STEP"]
        ):
            with open(os.environ["DEAD_FILE"], "w") as f:
                f.write(f"{os.getpid()} {time.time()}\n")
            os.kill(os.getpid(), getattr(signal, os.environ["DEAD_SIGNAL"]))


config = Config.from_yaml(sys.argv[1]).override(sys.argv[2:])
callbacks = [DieAt()] if "DEAD_RANK" in os.environ else []
guarded(lambda: Trainer(config, callbacks=callbacks, log=lambda _: None).fit())
