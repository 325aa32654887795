"""Whether a run got the processes it asked for: a check that needs only the launcher's environment."""
from __future__ import annotations

from collections.abc import Mapping

WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def lone_process_warning(env: Mapping[str, str]) -> str | None:
    """The warning for a run that asked accelerate for several processes and got one, else None.

    ``accelerate launch --num_processes N`` on a machine without GPUs uses its single-process launcher (several
    need ``--multi_gpu`` or an MPI hostfile), so the run silently trains at 1/N of the global batch. That
    launcher still sets MASTER_ADDR for N > 1, while every real multi-process launcher also sets a world size."""
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in env
    if launched_by_accelerate and "MASTER_ADDR" in env and not any(name in env for name in WORLD_SIZE_VARIABLES):
        return ("accelerate launch was asked for several processes but started one; on a machine without GPUs add "
                "--multi_gpu or use --config_file configs/accelerate/multi_cpu_2proc.yaml")
    return None
