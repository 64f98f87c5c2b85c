"""Data-parallel scaling of local learning: images/s on N ranks, and where the all-reduce time went.

Each rank trains a converted model on random data (the step's cost does not depend on the values) with the
trainer's own pieces: :class:`~auglocal_fx.PerLayerOptimizer` with a :class:`LayerGradSync` reducer, so layer
``k``'s all-reduce overlaps layer ``k+1``'s compute. Reported per step (median over the timed steps):

* ``step_s`` and ``images_per_s`` (of the global batch: ``batch`` is split over the ranks, as in training);
* ``wait_s``: the time the loop was blocked on all-reduces (not overlapped);
* ``comm_s``: the same buckets all-reduced alone, blocking, after training (what the all-reduce costs when
  nothing hides it); ``overlapped_s = comm_s - wait_s`` is the part hidden behind compute.

Run on N ranks: ``python -m auglocal_fx.distributed._bench --model resnet32 --batch 64 --nproc-per-node 2``
(or ``auglocal bench ... --nproc-per-node 2``); rank 0 prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["run_dp_bench", "main"]


def run_dp_bench(*, model: str, batch: int, img_size: int, layers: int, steps: int, warmup: int,
                 num_classes: int = 10, threads: Optional[int] = 1, bucket_cap_mb: float = 4.0,
                 device_type: str = "auto") -> Dict[str, Any]:
    """Time ``steps`` data-parallel local-learning steps on this job's ranks (call on every rank)."""
    import torch

    import auglocal_fx
    from auglocal_fx.hub import create_model
    from auglocal_fx.optim import PerLayerOptimizer

    from ._context import destroy, in_job, init_distributed, single_process
    from ._grad_sync import LayerGradSync

    if threads:
        torch.set_num_threads(threads)
    ctx = init_distributed(device_type=device_type, timeout_s=300) if in_job() else single_process()
    world = ctx.world_size
    if batch % world:
        raise ValueError(f"--batch {batch} does not divide among {world} ranks; use a multiple of {world}")
    torch.manual_seed(0)
    lm = auglocal_fx.convert(create_model(model, num_classes=num_classes), layers=layers,
                             input_size=(3, img_size, img_size)).to(ctx.device)
    sync = LayerGradSync(lm, bucket_cap_mb=bucket_cap_mb) if ctx.initialized else None
    if sync is not None:
        sync.broadcast_parameters()
    opt = PerLayerOptimizer(lm, lambda g: torch.optim.SGD(g, lr=0.01, momentum=0.9), reducer=sync)
    g = torch.Generator(device="cpu").manual_seed(ctx.rank)
    x = torch.randn(batch // world, 3, img_size, img_size, generator=g).to(ctx.device)
    y = torch.randint(0, num_classes, (batch // world,), generator=g).to(ctx.device)

    def step() -> None:
        lm.local_step(x, y, after_backward=opt.after_backward)
        opt.finish()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    times: List[float] = []
    waits: List[float] = []
    for _ in range(steps):
        if sync is not None:
            sync.reset_stats()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        waits.append(sync.stats.wait_s if sync is not None else 0.0)
    buckets = sync.stats.buckets if sync is not None else 0  # of the last timed step
    comm: List[float] = []
    if sync is not None:  # the same buckets, all-reduced with nothing to hide behind
        for p in lm.parameters():
            p.grad = torch.zeros_like(p)
        for _ in range(max(3, steps // 2)):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            sync.all_layers()
            comm.append(time.perf_counter() - t0)
    # The slowest rank sets the pace: take every figure from the rank with the longest median step.
    row = {"step_s": statistics.median(times), "wait_s": statistics.median(waits),
           "comm_s": statistics.median(comm) if comm else 0.0,
           "step_spread_s": max(times) - min(times)}
    if ctx.initialized:
        gathered: List[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, row)
        row = max(gathered, key=lambda r: r["step_s"])
    destroy(ctx)
    row.update(model=model, batch=batch, img_size=img_size, layers=len(lm.layers), world_size=world,
               backend=ctx.backend or "none", device=ctx.device.type, threads=threads, steps=steps,
               images_per_s=batch / row["step_s"], overlapped_s=max(row["comm_s"] - row["wait_s"], 0.0),
               buckets_per_step=buckets, bucket_cap_mb=bucket_cap_mb, rank=ctx.rank)
    return row


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m auglocal_fx.distributed._bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bucket-cap-mb", type=float, default=4.0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--nproc-per-node", type=int, default=None, help="start this many ranks here")
    args = parser.parse_args(argv)
    if args.nproc_per_node is not None:
        from ._launch import LaunchFailure, launch_local

        rest = [a for a in (argv if argv is not None else sys.argv[1:])]
        i = rest.index("--nproc-per-node")
        del rest[i:i + 2]
        try:
            launch_local(rest, nproc_per_node=args.nproc_per_node, module="auglocal_fx.distributed._bench")
        except LaunchFailure as exc:
            print(f"Error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)
        return
    row = run_dp_bench(model=args.model, batch=args.batch, img_size=args.img_size, layers=args.layers,
                       steps=args.steps, warmup=args.warmup, threads=args.threads, bucket_cap_mb=args.bucket_cap_mb,
                       device_type=args.device)
    if row["rank"] == 0:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
