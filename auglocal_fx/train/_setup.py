"""Building blocks of a run, each from the recipe: device, seeds, data loaders, model, optimizer, schedule."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ._recipe import Recipe, RecipeError
from ._results import TrainError

__all__ = ["resolve_device", "seed_everything", "RunData", "build_data", "build_model", "build_optimizer",
           "build_scheduler"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"recipe asks for device {name!r} but CUDA is not available here; use device: auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise TrainError(f"recipe asks for device {name!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainError("recipe asks for device 'mps' but MPS is not available here; use device: auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class RunData:
    train_loader: torch.utils.data.DataLoader
    eval_loader: torch.utils.data.DataLoader
    num_classes: int
    in_chans: int
    img_size: int
    mean: List[float]  # the input normalisation, for rules that reconstruct the image (InfoPro)
    std: List[float]


def build_data(recipe: Recipe, device: torch.device, *, num_replicas: int = 1, rank: int = 0) -> RunData:
    """Train and eval loaders; with ``num_replicas`` ranks, this rank's shard of every global batch."""
    from ..data import (create_dataset, create_loader, create_transforms, dataset_info, num_classes_of,
                        seeded_subset)

    d = recipe.data
    info = dataset_info(d.name)
    in_chans = info.in_chans
    img_size = d.img_size or info.img_size
    mean, std = list(d.mean or info.mean), list(d.std or info.std)
    for key, values in (("mean", mean), ("std", std)):
        if len(values) == 1 and in_chans > 1:
            values *= in_chans
        if len(values) != in_chans:
            raise RecipeError(f"recipe field 'data.{key}' has {len(values)} values but {d.name} images have "
                              f"{in_chans} channel(s)", field=f"data.{key}")
    augment = info.augment if d.augment == "auto" else d.augment
    common = dict(input_size=(in_chans, img_size, img_size), mean=mean, std=std, interpolation=d.interpolation,
                  crop_pct=d.crop_pct or info.crop_pct)
    native = info.img_size if d.name not in ("imagenet", "imagefolder") else None
    train_tf = create_transforms(is_training=True, augment=augment, native_size=native, auto_augment=d.auto_augment,
                                 re_prob=d.re_prob, **common)
    eval_tf = create_transforms(is_training=False, **common)
    where = dict(root=d.root, download=d.download, train_dir=d.train_dir, eval_dir=d.eval_dir)
    train_set = create_dataset(d.name, split="train", transform=train_tf, **where)
    eval_set = create_dataset(d.name, split="test", transform=eval_tf, **where)
    num_classes = info.num_classes or num_classes_of(train_set)
    train_set = seeded_subset(train_set, d.train_subset, seed=recipe.seed)
    eval_set = seeded_subset(eval_set, d.eval_subset, seed=recipe.seed)
    pin = device.type == "cuda" if d.pin_memory is None else d.pin_memory
    if recipe.batch_size % num_replicas:
        raise RecipeError(f"recipe field 'batch_size' ({recipe.batch_size}) is the global batch and must divide "
                          f"among the {num_replicas} ranks; use a multiple of {num_replicas}, e.g. "
                          f"{max(num_replicas, recipe.batch_size // num_replicas * num_replicas)}", field="batch_size")
    loader_args = dict(seed=recipe.seed, num_workers=d.num_workers, pin_memory=pin, num_replicas=num_replicas,
                       rank=rank)
    eval_batch = recipe.eval_batch_size or recipe.batch_size
    limit = recipe.limit_eval_batches * eval_batch if recipe.limit_eval_batches is not None else None
    # The eval batch size changes no figure: round it to a multiple of the ranks.
    eval_batch = max(num_replicas, eval_batch // num_replicas * num_replicas)
    return RunData(
        train_loader=create_loader(train_set, batch_size=recipe.batch_size, is_training=True, **loader_args),
        eval_loader=create_loader(eval_set, batch_size=eval_batch, is_training=False, limit=limit, **loader_args),
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=img_size,
        mean=mean,
        std=std,
    )


def build_model(recipe: Recipe, data: RunData, *, resuming: bool = False) -> nn.Module:
    """The recipe's model. When ``resuming``, the checkpoint's weights replace the starting ones, so pretrained
    weights are not fetched (a resumed run needs no network)."""
    from ..hub import create_model

    m = recipe.model
    kwargs = dict(m.kwargs)
    in_chans = m.in_chans or data.in_chans
    if in_chans != 3 or m.in_chans is not None:
        kwargs["in_chans"] = in_chans
    try:
        return create_model(m.name, num_classes=m.num_classes or data.num_classes,
                            pretrained=m.pretrained and not resuming,
                            pretrained_file=None if resuming else m.pretrained_file, **kwargs)
    except TypeError as e:
        if "in_chans" in kwargs and "in_chans" in str(e):
            raise TrainError(f"model {m.name!r} does not take in_chans, and {recipe.data.name} images have "
                             f"{in_chans} channel(s): use an auglocal_fx or timm model (timm:NAME)") from None
        raise TrainError(f"cannot build model {m.name!r} with model.kwargs {m.kwargs}: {e}") from None


def _param_groups(params: Sequence[Tuple[str, List[nn.Parameter]]], *, weight_decay: float,
                  filter_bias_and_bn: bool) -> List[Dict[str, Any]]:
    """Named groups; with ``filter_bias_and_bn`` each splits into a decayed and a no-decay part (1-D tensors)."""
    groups = []
    for name, plist in params:
        plist = [p for p in plist if p.requires_grad]
        if not filter_bias_and_bn:
            groups.append({"name": name, "params": plist, "weight_decay": weight_decay})
            continue
        decay = [p for p in plist if p.ndim > 1]
        no_decay = [p for p in plist if p.ndim <= 1]
        groups.append({"name": name, "params": decay, "weight_decay": weight_decay})
        groups.append({"name": f"{name}_no_decay", "params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def build_optimizer(recipe: Recipe, lm: nn.Module, rule: str, *,
                    before_step: Optional[Callable[[int, List[nn.Parameter]], None]] = None,
                    scaler: Optional[Any] = None, reducer: Optional[Any] = None) -> Any:
    """timm's optimizer over the parameters ``rule`` trains: one for the whole model, or one per local layer
    (``optimizer.per_layer``, a :class:`~auglocal_fx.PerLayerOptimizer` stepped in ``local_step``; with a
    data-parallel ``reducer`` each layer steps once its gradient all-reduce is done)."""
    from timm.optim import create_optimizer_v2

    from ..optim import PerLayerOptimizer
    from ._recipe import BACKPROP

    o = recipe.optimizer
    if rule != BACKPROP:
        named = [(g["name"], list(g["params"])) for g in lm.parameter_groups()]
    else:  # backprop never touches the aux nets: keep them out of the optimizer (and its memory)
        named = [("backbone", list(lm.backbone_parameters()))]
    groups = _param_groups(named, weight_decay=o.weight_decay, filter_bias_and_bn=o.filter_bias_and_bn)
    extra: Dict[str, Any] = {}
    if o.betas is not None:
        extra["betas"] = tuple(o.betas)
    if o.eps is not None:
        extra["eps"] = o.eps

    def make(param_groups: List[Dict[str, Any]]) -> torch.optim.Optimizer:
        return create_optimizer_v2(param_groups, opt=o.name, lr=o.lr, weight_decay=o.weight_decay,
                                   momentum=o.momentum, **extra)

    try:
        if o.per_layer and rule != BACKPROP:
            return PerLayerOptimizer(lm, make, groups=groups, before_step=before_step, scaler=scaler,
                                     reducer=reducer)
        return make(groups)
    except TypeError as e:
        raise RecipeError(f"optimizer {o.name!r} does not accept these settings ({e}); remove optimizer.betas/eps "
                          "or pick another optimizer.name", field="optimizer") from None
    except ValueError as e:  # tied weights across local layers
        raise RecipeError(f"recipe field 'optimizer.per_layer': {e}", field="optimizer.per_layer") from None


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer) -> Optional[Any]:
    from timm.scheduler import create_scheduler_v2

    s = recipe.schedule
    if s.name == "none":
        return None
    kwargs: Dict[str, Any] = dict(sched=s.name, num_epochs=recipe.epochs, warmup_epochs=s.warmup_epochs,
                                  warmup_lr=s.warmup_lr, min_lr=s.min_lr, decay_rate=s.decay_rate)
    if s.decay_epochs is not None:
        kwargs["decay_epochs"] = s.decay_epochs
    if s.decay_milestones is not None:
        kwargs["decay_milestones"] = list(s.decay_milestones)
    scheduler, _ = create_scheduler_v2(optimizer, **kwargs)
    return scheduler
