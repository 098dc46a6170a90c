"""Multi-host start-up: `jax.distributed.initialize()` when the launcher says so."""

from __future__ import annotations

from typing import Mapping

import jax


def initialize_from_env(env: Mapping[str, str]) -> bool:
    """Joins a multi-process run. Explicit: NVIUM_COORDINATOR (host:port),
    NVIUM_NUM_PROCESSES, NVIUM_PROCESS_ID. Auto-detected by jax: SLURM with more than one
    task, TPU pods. Returns whether a distributed runtime was started."""
    if env.get("NVIUM_COORDINATOR"):
        jax.distributed.initialize(
            coordinator_address=env["NVIUM_COORDINATOR"],
            num_processes=int(env["NVIUM_NUM_PROCESSES"]),
            process_id=int(env["NVIUM_PROCESS_ID"]),
        )
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1 or env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()
        return True
    return False
