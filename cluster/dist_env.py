"""torch.distributed rendezvous variables for one task of a submitit job (Slurm or the local executor).

The trainer initialises its process group from ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` (``env://``), the same variables torchrun sets. Under Slurm they come from the allocation:
``SLURM_PROCID`` -> rank, ``SLURM_NTASKS`` -> world size, ``SLURM_LOCALID`` -> local rank, ``SLURM_NODEID`` -> node,
and the first host of ``SLURM_JOB_NODELIST`` -> master address (submitit's ``JobEnvironment`` parses node-list
ranges such as ``gpu[07-08]``). ``CUDA_VISIBLE_DEVICES`` is left alone: the trainer calls
``torch.cuda.set_device(LOCAL_RANK)``, which would fail for local rank > 0 if each task saw one GPU only.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import submitit

MASTER_PORT_MIN = 20000
MASTER_PORT_SPAN = 40000


@dataclass(frozen=True)
class DistributedEnv:
    """The rendezvous of one task; ``node_rank`` / ``num_nodes`` are informational."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int


def master_port_for(job_id: str, restart_count: int) -> int:
    """A port in [20000, 60000) that every task of one job computes identically.

    A requeued job keeps its job id; mixing in the restart count gives the new run a different port, so its
    rendezvous never collides with a socket of the previous run still in TIME_WAIT on the master node.
    """
    return MASTER_PORT_MIN + zlib.crc32(f"{job_id}:{restart_count}".encode()) % MASTER_PORT_SPAN


def restart_count() -> int:
    """How many times Slurm has requeued this job (0 on the first run and outside Slurm)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def export_distributed_env() -> DistributedEnv:
    """Write the torch.distributed variables of this task into ``os.environ`` and return them.

    Must run inside a submitit job (it reads ``submitit.JobEnvironment``). The submitter clears inherited
    ``MASTER_*`` / ``RANK`` variables (``submitit.helpers.clean_env``), so a ``MASTER_PORT`` seen here was set on
    purpose (e.g. by a ``--setup`` line) and wins over the derived one; the other variables are overwritten.
    """
    job_env = submitit.JobEnvironment()
    port = os.environ.get("MASTER_PORT") or str(master_port_for(job_env.job_id, restart_count()))
    os.environ["MASTER_PORT"] = port
    tde = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return DistributedEnv(
        rank=tde.rank,
        world_size=tde.world_size,
        local_rank=tde.local_rank,
        local_world_size=tde.local_world_size,
        node_rank=job_env.node,
        num_nodes=job_env.num_nodes,
        master_addr=tde.master_addr,
        master_port=tde.master_port,
    )
