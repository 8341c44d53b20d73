"""Run by tests under torchrun: train from a JSON config; optionally crash one rank at a step."""

import json
import os
import sys

from smolpeft.train import TrainConfig, train

cfg = TrainConfig(**json.loads(sys.argv[1]))
crash_rank, crash_step = (int(x) for x in sys.argv[2].split(":")) if len(sys.argv) > 2 else (-1, -1)


def on_step(step: int) -> None:
    if int(os.environ.get("RANK", "0")) == crash_rank and step == crash_step:
        raise RuntimeError(f"simulated failure on rank {crash_rank} at step {step}")


train(cfg, on_step=on_step, log=lambda *_: None)
