"""Trains tiny-math for a few steps, as one process of a multi-process run or alone.

Run by ``tests/test_sharding.py``::

    python tests/multihost_worker.py --out OUT --data PROBLEMS [--resume]
        [--coordinator HOST:PORT --num-processes N --process-id I]

With ``--coordinator``, joins a run of N processes through :func:`rl.distributed.initialize` first.
Every process writes to the same run directory ``OUT``, as hosts sharing a file system would, and
``OUT/gathers.I.json``: the trainer methods that gathered the whole parameters onto the host.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import rl.trainer
from rl.config import GRPOConfig
from rl.distributed import initialize
from rl.trainer import Trainer, TrainJob

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny-math"
CONFIG = GRPOConfig(
    batch_size=4,
    num_generations=2,
    max_prompt_length=96,
    max_completion_length=16,
    max_steps=4,
    save_steps=3,
    learning_rate=1e-4,
    temperature=2.0,  # the tiny model is near-greedy at 1.0: most groups would have equal completions
    logprob_chunk=8,
)


def completion_length_reward(completions: list[str], answers: list[str]) -> list[float]:
    """Longer is better: a reward that differs within almost every group, so every step has a gradient
    (equal rewards in every group would leave only float noise, which Adam scales up to the learning rate)."""
    return [len(c) / 100 for c in completions]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    args = parser.parse_args()
    if args.coordinator:
        initialize(args.coordinator, args.num_processes, args.process_id)
    job = TrainJob(
        model=ASSETS / "model",
        tokenizer=ASSETS / "tokenizer",
        data=args.data,
        out=args.out,
        config=CONFIG,
        resume=args.resume,
        reward_workers=0,
        tensorboard=False,
        progress=False,
        reward=completion_length_reward,
    )
    gathers, gather = [], rl.trainer._host_params

    def recorded(params):
        gathers.append(inspect.stack()[1].function)
        return gather(params)

    rl.trainer._host_params = recorded
    print(json.dumps(Trainer(job).train()), flush=True)
    (args.out / f"gathers.{args.process_id}.json").write_text(json.dumps(gathers))


if __name__ == "__main__":
    main()
