"""``auglocal train RECIPE --nproc-per-node N``: N workers on this machine through torch's elastic launcher.

This is what ``torchrun --standalone --nproc-per-node N -m auglocal_fx train RECIPE`` does, called from Python:
:func:`torch.distributed.launcher.api.elastic_launch` with a c10d rendezvous on ``localhost:0`` (a free port
the launcher picks, never a fixed one), no restarts, and each worker running ``python -m auglocal_fx`` with
the same arguments. When a worker fails, the launcher stops the others (SIGTERM, then SIGKILL); Ctrl-C is
passed on to every worker once, and they stop together after the current step with a checkpoint.

Example::

    code = launch_local(["train", "quickstart", "-o", "runs/q"], nproc_per_node=2)   # 0 when every rank succeeded
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["launch_local", "LaunchFailure"]

INTERRUPTED = 130  # a worker stopped by Ctrl-C after writing its checkpoint (cli/train.py's exit code)


class LaunchFailure(RuntimeError):
    """Some worker exited non-zero; ``exit_code`` is what the launching command should exit with."""

    def __init__(self, message: str, *, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def launch_local(argv: Sequence[str], *, nproc_per_node: int, shutdown_timeout_s: int = 30,
                 env: Optional[Dict[str, str]] = None, module: str = "auglocal_fx") -> None:
    """Run ``python -m MODULE ARGV`` as ``nproc_per_node`` ranks of one job on this machine.

    Returns when every rank succeeded; raises :class:`LaunchFailure` (one line: which rank failed and why)
    otherwise. ``shutdown_timeout_s`` is how long the other ranks get to stop after one failed, or after
    Ctrl-C, before they are killed.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    # As torchrun does: one thread per worker unless asked otherwise, or N workers oversubscribe the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for key, value in (env or {}).items():
        os.environ[key] = value
    if os.environ.get("AUGLOCAL_DEBUG", "") in ("", "0"):
        # The launcher's own log lines repeat what the workers and LaunchFailure say in one line each.
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc_per_node, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
        start_method="spawn", shutdown_timeout=shutdown_timeout_s,
    )
    try:
        elastic_launch(config, sys.executable)("-u", "-m", module, *argv)
    except ChildFailedError as exc:
        raise _failure(exc.failures) from None
    except SignalException as exc:
        raise LaunchFailure(f"stopped by {exc.sigval.name}: the workers were asked to write a checkpoint and stop",
                            exit_code=INTERRUPTED) from None


def _failure(failures: Dict[int, object]) -> LaunchFailure:
    """One line for the launching command: the root cause, not the ranks that stopped because of it."""
    codes: List[Tuple[int, int, str]] = []
    for rank, failure in sorted(failures.items()):
        exitcode = int(getattr(failure, "exitcode", 1))
        codes.append((rank, exitcode, _reason(failure)))
    if all(code == INTERRUPTED for _, code, _ in codes):
        return LaunchFailure("interrupted: every rank stopped after writing its checkpoint; run the same command "
                             "with --resume to continue", exit_code=INTERRUPTED)
    # The root cause: a rank killed by a signal the launcher did not send (SIGKILL, out of memory), else one
    # that failed on its own; the ranks the launcher stopped afterwards (SIGTERM) are consequences.
    own = [c for c in codes if c[1] < 0 and -c[1] not in (signal.SIGTERM, signal.SIGINT)]
    errored = [c for c in codes if c[1] > 0]
    rank, code, reason = (own or errored or codes)[0]
    others = f" ({len(codes) - 1} other rank(s) stopped with it)" if len(codes) > 1 else ""
    return LaunchFailure(f"rank {rank} {reason}{others}", exit_code=1)


def _reason(failure: object) -> str:
    exitcode = int(getattr(failure, "exitcode", 1))
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with status {exitcode} (its own line above says why)"
