"""Training metrics: one JSON line per step (the record to analyse) and TensorBoard scalars (to watch)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax

from saerl_jax.io import atomic_write

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
"""JAX's event for one XLA compile (with its seconds)."""
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
"""JAX's event for one program read from the persistent compilation cache instead."""


class CompileCounter:
    """Counts the XLA programs this process builds while entered: compiles (and their seconds) and
    programs read from the persistent compilation cache. A training step that meets a new shape (a new
    prompt-length bucket, a new prefill batch of the slot engine) shows up as ``compiles > 0``."""

    def __init__(self):
        self.compiles = 0
        self.seconds = 0.0

    def _on_duration(self, event: str, duration: float, **_) -> None:
        if event == COMPILE_EVENT:
            self.compiles += 1
            self.seconds += duration

    def _on_event(self, event: str, **_) -> None:
        if event == CACHE_HIT_EVENT:
            self.compiles += 1

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)


def _open_log(path: Path, resume_step: int | None):
    """``path`` opened for appending: emptied for a new run, cut back to rows of steps <= ``resume_step``
    (atomically) for a resumed one."""
    if resume_step is None:
        path.unlink(missing_ok=True)
    elif path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
        text = "".join(line + "\n" for line in kept)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path.open("a")


class MetricsLog:
    """Appends ``{"step": s, ...}`` rows to ``metrics.jsonl`` and mirrors them to TensorBoard; the sample
    ids of each step go to ``batches.jsonl`` (``batches.<process>.jsonl`` on several hosts), and a row's
    per-problem held-out scores (``eval_correct``, a list) to ``evals.jsonl``, for paired statistics.

    On resume from step s, rows after s (written after the checkpoint the run went back to) are dropped
    first, so the files of a resumed run equal those of an uninterrupted one.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        resume_step: int | None = None,
        tensorboard: bool = True,
        process: tuple[int, int] = (0, 1),
    ):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "metrics.jsonl"
        index, count = process
        self.primary = index == 0
        self._file = _open_log(self.path, resume_step) if self.primary else None
        self._batches = _open_log(
            directory / ("batches.jsonl" if count == 1 else f"batches.{index}.jsonl"), resume_step
        )
        self._evals = _open_log(directory / "evals.jsonl", resume_step) if self.primary else None
        self._writer = None
        if tensorboard and self.primary:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(Path(directory) / "tensorboard"), purge_step=resume_step)

    def write(self, step: int, row: dict[str, float], sample_ids: list[str]) -> None:
        """Logs one step's metrics (non-finite values as null) and this host's sample ids in batch order."""
        self._batches.write(json.dumps({"step": step, "ids": sample_ids}) + "\n")
        self._batches.flush()
        if not self.primary:
            return
        row = dict(row)
        scores = row.pop("eval_correct", None)
        if scores is not None:
            self._evals.write(json.dumps({"step": step, "correct": [float(v) for v in scores]}) + "\n")
            self._evals.flush()
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in row.items()}
        self._file.write(json.dumps({"step": step, **clean}, sort_keys=True) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in clean.items():
                if value is not None:
                    self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        """Flushes and closes the outputs."""
        self._batches.close()
        if self._file is not None:
            self._file.close()
            self._evals.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(directory: str | os.PathLike) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``."""
    path = Path(directory) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_evals(directory: str | os.PathLike) -> dict[int, list[float]]:
    """Per evaluated step, the held-out problems' greedy scores (in the eval file's order) from
    ``evals.jsonl``; empty for a run written before it existed."""
    path = Path(directory) / "evals.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(row["step"]): row["correct"] for row in rows}
