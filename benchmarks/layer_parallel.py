"""Layer-parallel throughput on CPU: one process with one thread against S stages with one thread each.

Both train the same converted model on the same synthetic batches with the same code (``train_layers``); the
stages are separate processes linked by gloo (a file:// rendezvous), exactly as ``auglocal train
--nproc-per-node S --set parallel.stages=S`` runs them. Runs alternate (single, pipeline, single, ...) so that
other load on the machine hits both alike; the spread over repetitions is printed.

    python benchmarks/layer_parallel.py --model tv:resnet18 --layers 9 --size 64 --batch 16 --steps 12 --reps 3
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _build(args):
    import auglocal_fx
    from auglocal_fx.optim import PerLayerOptimizer

    torch.manual_seed(0)
    model = auglocal_fx.create_model(args.model, num_classes=10)
    lm = auglocal_fx.convert(model, layers=args.layers, input_size=(3, args.size, args.size))
    opt = PerLayerOptimizer(lm, lambda g: torch.optim.SGD(g, lr=0.01, momentum=0.9))
    return lm, opt


def _batches(args, n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(args.batch, 3, args.size, args.size, generator=g),
             torch.randint(0, 10, (args.batch,), generator=g)) for _ in range(n)]


def _own_session(args) -> None:
    # Linux shares the CPU fairly between sessions (autogroups), not threads: on a machine others load, S
    # processes in one session get one session's share in all. A session per process is what S separate
    # devices give: each stage its own share, like the single process.
    if args.own_session:
        os.setsid()


def _single(rank, args, out) -> None:
    from auglocal_fx.distributed._pipeline import train_layers

    _own_session(args)
    torch.set_num_threads(1)
    lm, opt = _build(args)
    data = _batches(args, args.steps + args.warmup)
    layers = range(len(lm.layers))
    for t, (x, y) in enumerate(data[:args.warmup]):
        train_layers(lm, layers, x, y, step=t, seed=0, optimizer=opt)
    t0 = time.perf_counter()
    for t, (x, y) in enumerate(data[args.warmup:]):
        train_layers(lm, layers, x, y, step=t, seed=0, optimizer=opt)
    with open(out, "w") as f:
        json.dump({"images_per_s": args.steps * args.batch / (time.perf_counter() - t0)}, f)


def single(args) -> float:
    """Images/s of one process (spawned like the stages) running every layer per batch."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        mp.spawn(_single, args=(args, out), nprocs=1)
        with open(out) as f:
            return json.load(f)["images_per_s"]


def _stage(rank, args, init_file, out):
    from auglocal_fx.distributed._pipeline import Stage
    from auglocal_fx.distributed._placement import make_placement, measured_costs, plan_costs, timed_layer_costs

    _own_session(args)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.stages,
                            timeout=datetime.timedelta(seconds=300))
    lm, opt = _build(args)
    if args.balance == "measured":  # as parallel.balance: measured does: timed on rank 0, then shared
        costs = [timed_layer_costs(lm, (3, args.size, args.size), args.batch) if rank == 0 else None]
        dist.broadcast_object_list(costs, src=0)
        placement = make_placement(costs[0], stages=args.stages, source="measured")
    else:
        placement = make_placement(plan_costs(lm.plan), stages=args.stages)
    stage = Stage(lm, layers=placement.stages[rank], prev_rank=rank - 1 if rank else None,
                  next_rank=rank + 1 if rank < args.stages - 1 else None, optimizer=opt, capacity=args.batch,
                  device=torch.device("cpu"), seed=0)
    data = _batches(args, args.steps + args.warmup) if rank == 0 else None
    stage.train_stream(data[:args.warmup] if data else None, first_step=0)  # warm-up, and the pipeline's links
    dist.barrier()
    t0 = time.perf_counter()
    result = stage.train_stream(data[args.warmup:] if data else None, first_step=args.warmup)
    seconds = time.perf_counter() - t0
    # Time of this stage's own compute per step, measured alone after the run: the stage balance.
    x, y = _batches(args, 1)[0]
    alone = measured_costs(lambda k, h: lm.train_layer(k, h, y)[0], x, len(lm.layers), repeats=1)
    lm.zero_grad(set_to_none=True)
    if rank == args.stages - 1:
        with open(out, "w") as f:
            json.dump({"seconds": seconds, "steps": result.steps, "placement": placement.to_dict(),
                       "measured_layer_s": alone}, f)
    dist.barrier()
    dist.destroy_process_group()


def pipeline(args) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        mp.spawn(_stage, args=(args, os.path.join(d, "init"), out), nprocs=args.stages)
        with open(out) as f:
            r = json.load(f)
    r["images_per_s"] = r["steps"] * args.batch / r["seconds"]
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tv:resnet18")
    p.add_argument("--layers", type=int, default=9)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--balance", choices=("flops", "measured"), default="flops",
                   help="balance the stages by plan FLOPs or by layer times measured at start (parallel.balance)")
    p.add_argument("--own-session", action="store_true", help="each process in its own session (os.setsid)")
    args = p.parse_args()
    singles, pipes, last = [], [], None
    for rep in range(args.reps):
        singles.append(single(args))
        last = pipeline(args)
        pipes.append(last["images_per_s"])
        print(f"rep {rep + 1}: single {singles[-1]:.1f} img/s, {args.stages} stages {pipes[-1]:.1f} img/s "
              f"({pipes[-1] / singles[-1]:.2f}x)", flush=True)
    costs = last["measured_layer_s"]
    stages = last["placement"]["stages"]
    measured_stage = [sum(costs[k] for k in s) for s in stages]
    speedups = [b / a for a, b in zip(singles, pipes)]
    report = {
        "model": args.model, "own_session": args.own_session, "layers": args.layers, "size": args.size, "batch": args.batch, "stages": stages,
        "single_img_s": singles, "pipeline_img_s": pipes, "speedup_median": statistics.median(speedups),
        "speedup_min": min(speedups), "speedup_max": max(speedups),
        "predicted_speedup_flops": last["placement"]["predicted_speedup"],
        "predicted_speedup_measured": sum(costs) / max(measured_stage),
        "stage_share_flops": [c / sum(last["placement"]["stage_costs"]) for c in last["placement"]["stage_costs"]],
        "stage_share_measured": [c / sum(measured_stage) for c in measured_stage],
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
