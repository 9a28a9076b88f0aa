"""Where this process stands among the processes torchrun started: its rank, the world
size, its local rank, the device and the share of the CPU that go with it, and the
key-value store all ranks share.

torchrun (also under Slurm: ``srun torchrun ...``) sets RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. :func:`join` meets the other ranks there
(env:// rendezvous), initialises torch.distributed's default process group on that store
(gloo on the CPU, NCCL on GPUs) and keeps the store for handing out work
(:mod:`.workqueue`). Outside torchrun, :func:`alone` is a world of one rank with an
in-process store, so the same code runs unchanged.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, List, Mapping, Optional, Tuple

from core.errors import UserError

log = logging.getLogger(__name__)

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# How long a rank waits to meet the others before giving up.
RENDEZVOUS_TIMEOUT = timedelta(minutes=30)
KEY_PREFIX = "fit3dmm"


def launched_by_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether torchrun (or another env:// launcher) started this process."""
    return all(environ.get(k) for k in TORCHRUN_ENV)


class LocalStore:
    """The part of torch.distributed's Store interface the work queue uses (``add``,
    ``set``, ``get``, ``check``), in this process, for a world of one (thread-safe)."""

    def __init__(self):
        self._data: Dict[str, bytes] = {}
        self._lock = threading.Lock()

    def add(self, key: str, amount: int) -> int:
        with self._lock:
            value = int(self._data.get(key, b"0")) + int(amount)
            self._data[key] = str(value).encode()
            return value

    def set(self, key: str, value) -> None:
        with self._lock:
            self._data[key] = value.encode() if isinstance(value, str) else bytes(value)

    def get(self, key: str) -> bytes:
        with self._lock:
            if key not in self._data:
                raise KeyError(key)
            return self._data[key]

    def check(self, keys: List[str]) -> bool:
        with self._lock:
            return all(k in self._data for k in keys)


@dataclass
class Ranks:
    """This process among the ranks of one job.

    rank / world_size: global; local_rank / local_world_size: on this machine. store: the
    shared key-value store (a torch.distributed Store, or a :class:`LocalStore` alone).
    distributed: started by torchrun (the default process group is initialised).
    backend: "gloo" or "nccl" when distributed. attempt: torchrun's restart count (its
    agent keeps the store across restarts, so every key goes under the attempt).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    store: Any = None
    distributed: bool = False
    backend: Optional[str] = None
    attempt: str = "0"  # torchrun's restart count: the store keys of this attempt

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        """"rank 1/2" (empty for a world of one)."""
        return f"rank {self.rank}/{self.world_size}" if self.world_size > 1 else ""

    def device_flags(self, device: str, gpu: Optional[int]) -> Tuple[str, Optional[int]]:
        """``--device`` / ``--gpu`` for this rank: under torchrun, ``auto`` and ``cuda``
        mean the GPU of this rank's LOCAL_RANK (modulo the GPUs there are) unless ``--gpu``
        names one; ``cpu`` and ``cuda:N`` stay as given."""
        spec = (device or "auto").strip().lower()
        if not self.distributed or gpu is not None or spec not in ("auto", "cuda"):
            return device, gpu
        import torch
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return (device, self.local_rank % n) if n else (device, gpu)

    def cpu_share(self, cores: int) -> int:
        """This rank's CPU threads: the machine's ``cores`` shared by the ranks on it."""
        return max(1, int(cores) // max(1, self.local_world_size))

    def cpu_threads(self) -> Optional[int]:
        """Under torchrun, this rank's share of this machine's cores; None alone (every core)."""
        from core.threads import cpu_cores
        return self.cpu_share(cpu_cores()) if self.distributed else None

    def key(self, name: str) -> str:
        """A store key of this job's attempt (torchrun's restarts start afresh)."""
        return f"{KEY_PREFIX}/{self.attempt}/{name}"

    def close(self) -> None:
        """Leave the process group (a no-op alone)."""
        if self.distributed:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def alone() -> Ranks:
    """A world of one rank with an in-process store."""
    return Ranks(store=LocalStore())


def join(use_cuda: bool, environ: Mapping[str, str] = os.environ) -> Ranks:
    """Meet the other ranks of a torchrun job (env:// rendezvous), initialise the default
    process group on the shared store (NCCL when ``use_cuda``, else gloo) and return this
    process's :class:`Ranks`. UserError when the rendezvous fails."""
    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("started by torchrun, but this torch build has no torch.distributed")
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    local_world = int(environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        store, rank, world = next(dist.rendezvous("env://", timeout=RENDEZVOUS_TIMEOUT))
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"torchrun rendezvous at {environ.get('MASTER_ADDR')}:{environ.get('MASTER_PORT')} "
                        f"failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    backend = "nccl" if use_cuda and dist.is_nccl_available() else "gloo"
    ranks = Ranks(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world, store=store,
                  distributed=True, backend=backend, attempt=environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    # The process group's keys too go under the attempt, or a restarted rank would meet the
    # addresses of the ranks that died.
    dist.init_process_group(backend, store=dist.PrefixStore(ranks.key("process_group"), store), rank=rank,
                            world_size=world)
    log.debug("rank %d of %d (local %d of %d), %s", rank, world, local_rank, local_world, backend)
    return ranks


def start(device: str = "auto") -> Ranks:
    """:func:`join` when torchrun started this process (NCCL when ``device`` is to be a
    GPU), else :func:`alone`."""
    if not launched_by_torchrun():
        return alone()
    import torch
    use_cuda = (device or "auto").strip().lower() != "cpu" and torch.cuda.is_available()
    return join(use_cuda)
