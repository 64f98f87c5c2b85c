"""The whole zoo: every model in a forked worker with a time and a memory limit, the report rewritten after each.

A crash, a hang or a model that exhausts memory fails that model only; ``resume=True`` picks up an interrupted run.

Example::

    from auglocal_fx.zoo import run_zoo, select_models
    report = run_zoo(select_models("torchvision", ["resnet1*"]), json_path="zoo.json", timeout=600)
    print(report["summary"]["torchvision"]["pass_rate"])
"""
from __future__ import annotations

import gc
import os
import platform
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .._versions import package_version
from .check import _BATCH, ZooResult, _short_traceback, _tune_malloc, check_model, one_line
from .catalog import ZooModel
from .report import _clean, _make_report, read_json, write_json

__all__ = ["run_zoo"]


def _versions() -> Dict[str, Optional[str]]:
    return {
        "python": sys.version.split()[0],
        "torch": package_version("torch"),
        "torchvision": package_version("torchvision"),
        "timm": package_version("timm"),
        "auglocal_fx": package_version("auglocal-fx", "auglocal_fx"),
    }


def _machine() -> Dict[str, Any]:
    info: Dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            info["memory_gib"] = round(kb / 2**20, 1)
    except OSError:
        pass
    return info


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (0 where /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _run_forked(
    model: ZooModel,
    kwargs: Dict[str, Any],
    timeout: float,
    on_step: Callable[[str], None],
    max_memory: Optional[float] = None,
) -> ZooResult:
    """``check_model`` in a forked child; a crash, a kill, a timeout or using more than ``max_memory`` bytes fails
    the model at its current step."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(model, kwargs, child_conn), daemon=True)
    start = time.perf_counter()
    proc.start()
    child_conn.close()
    step, result, peak, over, timed_out, last_snapshot = "create", None, 0, False, False, None
    try:
        while True:
            remaining = timeout - (time.perf_counter() - start)
            if remaining <= 0:
                timed_out = True
                break
            peak = max(peak, _rss_bytes(proc.pid))
            if max_memory and peak > max_memory:
                over = True
                break
            if parent_conn.poll(min(remaining, 0.5)):
                try:
                    kind, payload = parent_conn.recv()
                except EOFError:
                    break
                if kind == "step":
                    step = payload
                    on_step(step)
                elif kind == "snapshot":
                    last_snapshot = payload
                else:
                    result = ZooResult.from_dict(payload)
                    break
            elif not proc.is_alive() and not parent_conn.poll(0):
                break
    finally:
        parent_conn.close()
    seconds = round(time.perf_counter() - start, 3)
    if result is not None:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        result.peak_memory_gib = round(peak / 2**30, 2) if peak else None
        return result
    if timed_out or over:
        proc.kill()
    proc.join(30)  # the pipe closed: the worker is exiting (or was killed)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if over:
        reason = f"used more than {max_memory / 2**30:.0f} GiB of memory (the per-model limit) in step {step}"
    elif timed_out:
        reason = f"timed out after {timeout:.0f} s (per-model limit) in step {step}"
    else:
        code = proc.exitcode
        what = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        hint = " (killed: out of memory?)" if code == -signal.SIGKILL else ""
        reason = f"the worker process died with {what}{hint} in step {step}"
    failure = ZooResult.from_dict(last_snapshot) if last_snapshot else ZooResult(
        source=model.source, name=model.name, family=model.family, params=model.params)
    failure.status, failure.failed_step, failure.reason, failure.seconds = "fail", step, reason, seconds
    failure.peak_memory_gib = round(peak / 2**30, 2) if peak else None
    return failure


def _child_main(model: ZooModel, kwargs: Dict[str, Any], conn) -> None:
    try:  # if memory runs out, the kernel should pick this worker, not a neighbour's process
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    _tune_malloc()
    try:
        result = check_model(model, progress=lambda s: conn.send(("step", s)),
                             snapshot=lambda r: conn.send(("snapshot", _clean(r.to_dict()))), **kwargs)
        conn.send(("result", _clean(result.to_dict())))
    except BaseException as exc:  # anything the recorder did not catch: still report it
        failure = ZooResult(source=model.source, name=model.name, family=model.family, status="fail",
                            failed_step="create", reason=one_line(exc), traceback=_short_traceback(exc))
        try:
            conn.send(("result", failure.to_dict()))
        except Exception:
            pass
    finally:
        conn.close()
        os._exit(0)  # skip atexit handlers and finalizers inherited from the parent


def run_zoo(
    models: Sequence[ZooModel],
    *,
    json_path: Optional[Path] = None,
    input_size: Optional[Sequence[int]] = None,
    isolate: bool = True,
    timeout: float = 900.0,
    resume: bool = False,
    retry_failed: bool = False,
    seed: int = 0,
    threads: Optional[int] = 1,
    max_memory_gib: Optional[float] = None,
    memory_budget_gib: Optional[float] = None,
    command: Optional[str] = None,
    on_result: Optional[Callable[[ZooResult, int, int], None]] = None,
    on_step: Optional[Callable[[ZooModel, str], None]] = None,
) -> Dict[str, Any]:
    """Check every model; write the JSON report after each one (atomically) when ``json_path`` is given.

    Args:
        isolate: run each model in a forked child process (a crash, an out-of-memory kill or a hang then fails
            that model only; ``timeout`` and ``max_memory_gib`` are enforced). Without it, models run in this
            process, one after another.
        resume: keep the results already in ``json_path`` for models that are asked for again, and skip them.
        retry_failed: with ``resume``, check the models that failed in ``json_path`` again.
        max_memory_gib: kill a worker whose resident memory exceeds this (isolated runs).
        memory_budget_gib: a conversion whose weights alone would exceed this is not attempted (its ``convert``
            step fails with the estimate); defaults to 80% of ``max_memory_gib``.
        on_result: called with ``(result, index, total)`` after each model (progress output).
    Returns:
        The report dict (what the JSON holds).
    """
    json_path = Path(json_path) if json_path else None
    budget = memory_budget_gib if memory_budget_gib is not None else (max_memory_gib * 0.8 if max_memory_gib else None)
    previous: Dict[Tuple[str, str], ZooResult] = {}
    meta: Dict[str, Any] = {
        "command": command,
        "started": _now(),
        "finished": None,
        "complete": False,
        "wall_seconds": 0.0,
        "versions": _versions(),
        "machine": _machine(),
        "settings": {"batch": _BATCH, "seed": seed, "threads": threads, "max_memory_gib": max_memory_gib,
                     "memory_budget_gib": budget, "timeout_s": timeout, "isolate": isolate,
                     "input_size": list(input_size) if input_size else None, "layers": ["units", 4]},
    }
    elapsed_before = 0.0
    if resume and json_path is not None and json_path.is_file():
        old = read_json(json_path)
        previous = {(r["source"], r["name"]): ZooResult.from_dict(r) for r in old.get("results", [])
                    if not (retry_failed and r.get("status") == "fail")}
        meta["started"] = old.get("started", meta["started"])
        elapsed_before = float(old.get("wall_seconds") or 0.0)
    start = time.perf_counter()
    results: List[ZooResult] = []
    kwargs = {"input_size": input_size, "seed": seed, "threads": threads,
              "memory_budget": budget * 2**30 if budget else None}
    total = len(models)
    for index, model in enumerate(models):
        key = (model.source, model.name)
        if key in previous:
            result = previous[key]
        else:
            if isolate:
                result = _run_forked(model, kwargs, timeout, lambda s, m=model: on_step and on_step(m, s),
                                     max_memory=max_memory_gib * 2**30 if max_memory_gib else None)
            else:
                result = check_model(model, progress=lambda s, m=model: on_step and on_step(m, s), **kwargs)
            gc.collect()
        if result.family is None:
            result.family = model.family
        results.append(result)
        meta["wall_seconds"] = round(elapsed_before + time.perf_counter() - start, 1)
        if json_path is not None:
            write_json(_make_report(results, meta), json_path)
        if on_result is not None:
            on_result(result, index, total)
    meta.update(finished=_now(), complete=True, wall_seconds=round(elapsed_before + time.perf_counter() - start, 1))
    report = _make_report(results, meta)
    if json_path is not None:
        write_json(report, json_path)
    return report
