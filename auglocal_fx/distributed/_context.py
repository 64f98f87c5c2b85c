"""The process group of a run: who this process is, on which device, and how every rank stops together.

``init_distributed`` joins the job torchrun (or ``auglocal train --nproc-per-node N``, or a test with a file
store) started, with NCCL on GPUs and gloo on CPUs and a timeout on every collective, and lays the ranks out
on a :class:`~torch.distributed.device_mesh.DeviceMesh` (1-D ``("dp",)`` by default; ``("pp", "dp")`` for
layer-parallel stages times data-parallel replicas). Without a job around it (no ``RANK``/``WORLD_SIZE`` in
the environment and no ``init_method``) it returns a single-process context and initialises nothing, so the
same code runs on one device. ``fail_together`` turns a failure on any rank into every rank exiting at once
with one line, instead of the others hanging in their next collective.

Example (each of the N processes torchrun starts)::

    ctx = init_distributed(device_type="auto", timeout_s=300)              # 1-D mesh over all ranks
    ctx = init_distributed(device_type="cpu", timeout_s=60,                # or 2 stages x N/2 replicas
                           mesh_shape=(2, ctx_world // 2), mesh_dim_names=("pp", "dp"))
    with fail_together(ctx):
        dp = ctx.group("dp")                                               # a ProcessGroup (None: default)
        torch.distributed.all_reduce(t, group=dp)
        if ctx.is_main:
            save(...)
    destroy(ctx)
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["DistContext", "DistError", "init_distributed", "destroy", "fail_together", "single_process",
           "current_context", "in_job", "describe_failure", "FAILURE_KEY"]

FAILURE_KEY = "auglocal_fx/failure"  # store key: the one line of the first rank that failed
_POLL_SECONDS = 0.5


class DistError(RuntimeError):
    """The distributed job cannot start or go on; the message says why and what to do."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job. ``world_size == 1`` and ``initialized == False`` for a plain run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None  # "nccl" or "gloo"; None when no process group exists
    timeout_s: float = 0.0
    mesh: Optional[Any] = None  # torch.distributed.device_mesh.DeviceMesh over all ranks, when initialized
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that shows progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.initialized and self.world_size > 1

    def group(self, dim: Optional[str] = None) -> Optional[Any]:
        """The ProcessGroup of mesh dimension ``dim`` ("dp", "pp") this rank belongs to; None = the default group."""
        if self.mesh is None or dim is None:
            return None
        if self.mesh.ndim == 1 and self.mesh.mesh_dim_names in (None, (dim,)):
            return self.mesh.get_group()
        return self.mesh.get_group(dim)

    def size(self, dim: Optional[str] = None) -> int:
        """Number of ranks along mesh dimension ``dim`` (the whole world for None or a 1-D mesh of that name)."""
        if self.mesh is None or dim is None:
            return self.world_size
        return self.mesh.size(self.mesh.mesh_dim_names.index(dim)) if self.mesh.mesh_dim_names else self.world_size

    def coordinate(self, dim: str) -> int:
        """This rank's index along mesh dimension ``dim`` (its dp replica, or its pp stage)."""
        if self.mesh is None:
            return 0
        return self.mesh.get_local_rank(dim)

    @property
    def store(self) -> Optional[Any]:
        """The job's key-value store (the rendezvous store), shared by every rank."""
        if not self.initialized:
            return None
        return dist.distributed_c10d._get_default_store()


def single_process(device: Optional[torch.device] = None) -> DistContext:
    """The context of a plain, non-distributed run."""
    return DistContext(device=device or torch.device("cpu"))


def in_job() -> bool:
    """Whether this process was started as one rank of a job (torchrun's ``RANK`` and ``WORLD_SIZE`` are set)."""
    return _env_int("RANK") is not None and _env_int("WORLD_SIZE") is not None


def current_context(*, timeout_s: float = 0.0) -> DistContext:
    """The context of a process group someone else initialised (a user's own torchrun script), 1-D mesh."""
    if not dist.is_initialized():
        raise DistError("torch.distributed is not initialised; call init_distributed() instead")
    backend = dist.get_backend()
    local_rank = _env_int("LOCAL_RANK") or 0
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    return DistContext(rank=dist.get_rank(), world_size=world, local_rank=local_rank,
                       local_world_size=_env_int("LOCAL_WORLD_SIZE") or world, device=device, backend=backend,
                       timeout_s=timeout_s, mesh=mesh, initialized=True)


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def _pick_device(device_type: str, local_rank: int) -> torch.device:
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise DistError("distributed training on device 'cuda' needs CUDA, which is not available here; "
                            "use device: cpu (gloo)")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise DistError(f"local rank {local_rank} has no GPU: this machine shows {count}; start at most "
                            f"{count} processes per node (--nproc-per-node {count})")
        return torch.device("cuda", local_rank)
    if device_type == "cpu":
        return torch.device("cpu")
    raise DistError(f"distributed training runs on cuda (NCCL) or cpu (gloo), not {device_type!r}")


def init_distributed(
    *,
    device_type: str = "auto",
    timeout_s: float = 600.0,
    mesh_shape: Optional[Sequence[int]] = None,
    mesh_dim_names: Optional[Sequence[str]] = None,
    init_method: Optional[str] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> DistContext:
    """Join the job as torchrun describes it in the environment (``env://``), or as ``init_method`` says.

    Args:
        device_type: "auto" (cuda when present), "cuda" (NCCL, device ``cuda:LOCAL_RANK``) or "cpu" (gloo).
        timeout_s: the longest any collective may wait for the other ranks before it fails.
        mesh_shape / mesh_dim_names: the device mesh; default ``(world_size,)`` named ``("dp",)``.
        init_method / rank / world_size: e.g. ``"file:///tmp/x"`` with explicit ranks (tests); default: the
            environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).

    Returns the context; a single-process one (nothing initialised) when there is no job to join.
    """
    rank = rank if rank is not None else _env_int("RANK")
    world_size = world_size if world_size is not None else _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK")
    local_rank = local_rank if local_rank is not None else (rank or 0)
    local_world = _env_int("LOCAL_WORLD_SIZE") or world_size or 1
    if init_method is None and (rank is None or world_size is None):
        if device_type == "auto":
            return single_process()
        return single_process(_pick_device(device_type, 0))
    if dist.is_initialized():
        raise DistError("torch.distributed is already initialised in this process; call destroy() first")
    device = _pick_device(device_type, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs: dict = {"backend": backend, "init_method": init_method or "env://",
                    "timeout": timedelta(seconds=timeout_s), "rank": rank, "world_size": world_size}
    if device.type == "cuda":
        kwargs["device_id"] = device  # eager NCCL init: a wrong GPU fails here, not in the first collective
    dist.init_process_group(**{k: v for k, v in kwargs.items() if v is not None})
    rank, world_size = dist.get_rank(), dist.get_world_size()
    shape: Tuple[int, ...] = tuple(mesh_shape) if mesh_shape is not None else (world_size,)
    names = tuple(mesh_dim_names) if mesh_dim_names is not None else (("dp",) if len(shape) == 1 else None)
    if int(torch.tensor(shape).prod()) != world_size:
        dist.destroy_process_group()
        raise DistError(f"a device mesh of shape {shape} needs {int(torch.tensor(shape).prod())} processes, but "
                        f"the job has {world_size}; change the number of processes or the mesh")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_world,
                       device=device, backend=backend, timeout_s=float(timeout_s), mesh=mesh, initialized=True)


def destroy(ctx: DistContext) -> None:
    """Leave the process group (a no-op for a single-process context)."""
    if ctx.initialized and dist.is_initialized():
        dist.destroy_process_group()


def describe_failure(exc: BaseException) -> str:
    """One line for an exception on a rank (a failed collective says that another rank is the likely cause)."""
    peer = getattr(exc, "peer_failure", None)
    return f"stopping because {peer}" if peer else _one_line(exc)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, dist.DistError) or "gloo" in text.lower() or "nccl" in text.lower():
        text = f"a collective failed (another rank stopped, crashed or timed out): {text}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), text)
    return first if len(first) <= 300 else first[:297] + "..."


def _exit_line(rank: int, reason: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"rank {rank}: {reason}\n")
    sys.stderr.flush()


@contextlib.contextmanager
def fail_together(ctx: DistContext, *, poll_s: float = _POLL_SECONDS) -> Iterator[None]:
    """Make a failure on one rank stop every rank within ``poll_s`` seconds, each with one line.

    Inside the block, an exception on this rank is published in the job's store (the first one wins) and
    re-raised. A thread polls the store: once another rank has published a failure, this process writes
    ``rank R: stopping because rank S failed: REASON`` to stderr and exits with status 1 at once (whatever it
    was doing: files are written atomically, so the last good checkpoint stays). A rank killed outright
    (SIGKILL, out of memory) publishes nothing; its peers then fail in their next collective (gloo sees the
    closed connection; NCCL after the collective timeout) and publish that. A no-op without a process group.
    """
    store = ctx.store if ctx.distributed else None
    if store is None:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.wait(poll_s):
            try:
                if not store.check([FAILURE_KEY]):
                    continue
                reason = store.get(FAILURE_KEY).decode(errors="replace")
            except Exception:  # the store is gone: the job is ending; the main thread will find out
                return
            if done.is_set() or reason.startswith(f"rank {ctx.rank} "):
                return
            _exit_line(ctx.rank, f"stopping because {reason}")
            os._exit(1)

    watcher = threading.Thread(target=watch, name="auglocal-fail-together", daemon=True)
    watcher.start()
    try:
        yield
    except BaseException as exc:
        done.set()
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        reason = f"rank {ctx.rank} failed: {_one_line(exc) if not isinstance(exc, KeyboardInterrupt) else 'interrupted'}"
        try:
            # compare_set with an empty expected value writes only if the key is absent: the first failure wins.
            first = store.compare_set(FAILURE_KEY, "", reason).decode(errors="replace")
        except Exception:
            first = reason
        if not first.startswith(f"rank {ctx.rank} "):
            # This rank failed because another one did first (a collective on a dead peer): say who.
            exc.peer_failure = first  # type: ignore[attr-defined]
        raise
    finally:
        done.set()
