"""One rank of the data-parallel tests: joins a gloo group through a file store, trains with the real engine,
and records after every optimizer step the weights, buffers and losses of its model.

    python tests/_dist_worker.py RANK WORLD INIT_FILE OUT_DIR RECIPE_JSON [--resume] [--stop-after N]

WORLD 1 trains without any process group (the single-process reference). Also the home of the test models
(``create_model("_dist_worker:plain_net")``): the workers import it from ``tests/`` on ``PYTHONPATH``.
"""
from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn


def plain_net(*, num_classes: int = 10, in_chans: int = 1, width: int = 8, norm: bool = False) -> nn.Sequential:
    """Conv-(BN-)ReLU blocks and a linear head; without BatchNorm, data-parallel equals one process exactly."""

    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=not norm)]
        layers += [nn.BatchNorm2d(cout)] if norm else []
        return nn.Sequential(*layers, nn.ReLU())

    return nn.Sequential(block(in_chans, width, 1), block(width, width * 2, 2), block(width * 2, width * 2, 1),
                         block(width * 2, width * 4, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width * 4, num_classes))


def record_training(rec: dict, out: str, *, rank: int = 0, resume: bool = False,
                    stop_after: Optional[int] = None) -> dict:
    """Train with the engine, recording the weights, buffers and losses after every step."""
    from auglocal_fx.train import _run, train

    records = []
    stop = threading.Event()
    original = _run.Run._step

    def recording_step(self, x, y, params):
        losses = original(self, x, y, params)
        state = {k: v.detach().clone() for k, v in self.lm.state_dict().items()}
        records.append({"losses": losses.detach().clone(), "batch": y.shape[0], "state": state})
        if stop_after is not None and len(records) >= stop_after and rank == 0:
            stop.set()  # as a Ctrl-C on rank 0 alone: every rank must stop after the same step
        return losses

    _run.Run._step = recording_step
    try:
        result = train(rec, output_dir=out, resume=resume, quiet=True, stop=stop)
    finally:
        _run.Run._step = original
    return {"records": records, "interrupted": result.interrupted, "top1": result[next(iter(result.runs))].top1}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rank", type=int)
    parser.add_argument("world", type=int)
    parser.add_argument("init_file")
    parser.add_argument("out")
    parser.add_argument("recipe")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-after", type=int, default=None)
    args = parser.parse_args()

    from auglocal_fx.distributed import destroy, init_distributed, single_process

    ctx = single_process()
    if args.world > 1:
        ctx = init_distributed(device_type="cpu", timeout_s=30, init_method=f"file://{args.init_file}",
                               rank=args.rank, world_size=args.world)
    record = record_training(json.loads(args.recipe), args.out, rank=args.rank, resume=args.resume,
                             stop_after=args.stop_after)
    torch.save(record, Path(args.out) / f"rank{args.rank}-of-{args.world}{'-resumed' if args.resume else ''}.pt")
    destroy(ctx)


if __name__ == "__main__":
    main()
