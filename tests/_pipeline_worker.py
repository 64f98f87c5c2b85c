"""Processes spawned by tests/test_pipeline.py: one pipeline stage each, over gloo with a file:// rendezvous."""
from __future__ import annotations

import datetime
import os
from typing import List, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

import auglocal_fx
from auglocal_fx.optim import PerLayerOptimizer


class TinyNet(nn.Module):
    """Four units with BatchNorm and dropout (in the layers, the aux nets and the head)."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2))
        self.b2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                nn.Dropout(0.2))
        self.b3 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(16 * 4 * 4, num_classes))

    def forward(self, x):
        return self.fc(self.b3(self.b2(self.b1(self.stem(x)))))


SEED = 7
BATCH = 6


def build(rule: str = "auglocal"):
    """The same converted model and per-layer optimizer in every process."""
    torch.manual_seed(SEED)
    lm = auglocal_fx.convert(TinyNet(), layers=4, input_size=(3, 8, 8), rule=rule)
    make = lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    clip = lambda k, params: torch.nn.utils.clip_grad_norm_(params, 0.5)  # per-layer clipping, as the runs do
    return lm, PerLayerOptimizer(lm, make, before_step=clip)


def batches(steps: int):
    g = torch.Generator().manual_seed(SEED + 1)
    return [(torch.randn(BATCH, 3, 8, 8, generator=g), torch.randint(0, 5, (BATCH,), generator=g))
            for _ in range(steps)]


def reference(steps: int, rule: str = "auglocal", *, seed_offset: int = 0):
    """The single-process loop: all layers, one after the other, per batch (``seed_offset``: other dropout)."""
    from auglocal_fx.distributed._pipeline import train_layers

    lm, opt = build(rule)
    lm.train()
    for t, (x, y) in enumerate(batches(steps)):
        train_layers(lm, range(len(lm.layers)), x, y, step=t, seed=SEED + seed_offset, optimizer=opt)
    return lm


def stage_main(rank: int, world: int, init_file: str, out_dir: str, placement: Sequence[Sequence[int]],
               steps: int, rule: str = "auglocal") -> None:
    from auglocal_fx.distributed._pipeline import Stage

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        lm, opt = build(rule)
        lm.train()
        stage = Stage(lm, layers=placement[rank], prev_rank=rank - 1 if rank > 0 else None,
                      next_rank=rank + 1 if rank < world - 1 else None, optimizer=opt, capacity=BATCH,
                      device=torch.device("cpu"), seed=SEED)
        data = batches(steps) if rank == 0 else None
        # Two streams (two "epochs") back to back: the buffers and markers must carry over cleanly.
        half = steps // 2
        first = stage.train_stream(data[:half] if data else None, first_step=0)
        second = stage.train_stream(data[half:] if data else None, first_step=half)
        state = {k: v for k, v in lm.state_dict().items()
                 if any(k.startswith(f"layers.{i}.") or k.startswith(f"aux.{i}.") for i in placement[rank])}
        torch.save({"state": state, "steps": first.steps + second.steps,
                    "losses": (first.loss_sums + second.loss_sums).tolist()},
                   os.path.join(out_dir, f"stage{rank}.pt"))
    finally:
        dist.destroy_process_group()


def tiny_recipe(**overrides):
    """ResNet-8 on scikit-learn's digits (no download), K=4, a few batches: the engine end to end."""
    recipe = {"name": "pp", "rule": "auglocal", "model": {"name": "resnet8"}, "convert": {"layers": 4},
              "data": {"name": "digits", "train_subset": 192, "eval_subset": 64},
              "optimizer": {"name": "sgd", "lr": 0.05}, "schedule": {"name": "cosine"},
              "epochs": 2, "batch_size": 32, "seed": 3, "device": "cpu", "num_threads": 1,
              "deterministic": True}
    recipe.update(overrides)
    return recipe


def train_main(rank: int, world: int, init_file: str, out_dir: str, overrides: dict, resume: bool = False,
               stop_after: int = 0) -> None:
    """One rank of ``auglocal_fx.train`` under a file:// rendezvous (as torchrun would start it)."""
    import threading

    from auglocal_fx.train import train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    stop = threading.Event()
    if stop_after and rank == 0:
        # Stand-in for Ctrl-C on stage 0: stop once it has fed `stop_after` batches.
        from auglocal_fx.distributed import _pipeline

        original = _pipeline.Stage._agree_stop
        count = [0]

        def counting(self, flag):
            count[0] += 1
            return original(self, flag or count[0] > stop_after)

        _pipeline.Stage._agree_stop = counting
    try:
        result = train(tiny_recipe(**overrides), output_dir=out_dir, resume=resume, quiet=True, stop=stop)
        if rank == 0:
            torch.save({"interrupted": result.interrupted, "top1": result["auglocal"].top1,
                        "layer_acc": result["auglocal"].layer_acc}, os.path.join(out_dir, "result.pt"))
    finally:
        dist.destroy_process_group()
