"""Multi-host start-up: one process per host, joined into one JAX runtime before anything touches a device.

Each process then sees every host's devices in ``jax.devices()`` (the mesh of :mod:`rl.sharding` spans
them all) but only its own in ``jax.local_devices()``. The trainer's data stays per host: every process
reads its own Grain shard (``ShardOptions(jax.process_index(), jax.process_count())``), i.e. its slice of
each global batch, rolls out and grades it, and contributes those rows to the sharded update.
"""

from __future__ import annotations

import jax


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Joins this process to a run of ``num_processes`` (call once per process, before any JAX work).

    Start one process per host (or per accelerator group), all with the same ``coordinator_address``
    (``host:port`` of process 0, which also runs the coordination service) and distinct ``process_id``
    in ``[0, num_processes)``. On CPU, cross-process collectives go through gloo over TCP.

    Args:
      coordinator_address: ``host:port`` reachable from every process.
      num_processes: processes in the run.
      process_id: this process's index.

    Raises:
      ValueError: ``process_id`` is outside ``[0, num_processes)``.
    """
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
