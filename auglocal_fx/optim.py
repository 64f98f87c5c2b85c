"""The per-layer optimizer step: each local layer and its aux net step right after their own backward.

Local learning gives layer ``k``'s parameters gradient from loss ``k`` alone, so stepping them as soon as that
backward ends computes the same update as one optimizer stepped after the whole batch, while only one layer's
gradients are ever alive (they are dropped right after the step). It is also what lets layers on different
devices step independently (the layer-parallel trainer) and what the data-parallel trainer hooks its
all-reduce into.

``PerLayerOptimizer`` keeps one optimizer per layer but shows their param groups as one list, so timm's (or
torch's) LR schedulers drive it like a single optimizer::

    opt = PerLayerOptimizer(lm, lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9))
    scheduler = timm.scheduler.CosineLRScheduler(opt, t_initial=10)   # sets the lr of every layer's groups
    opt.zero_grad()
    lm.local_step(x, y, after_backward=opt.after_backward)             # layer k steps at the end of its backward

With a ``reducer`` (data-parallel training: :class:`auglocal_fx.distributed.LayerGradSync`) the step is
deferred: ``after_backward(k)`` launches layer ``k``'s gradient all-reduce and returns, so that it overlaps
layer ``k+1``'s compute; layer ``k`` steps once its averaged gradients are in, at the latest in
:meth:`PerLayerOptimizer.finish`, which the training loop calls at the end of every batch.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Protocol, Sequence

import torch
import torch.nn as nn

__all__ = ["PerLayerOptimizer", "GradReducer", "layer_param_groups"]

ParamGroups = List[Dict[str, Any]]
OptimizerFactory = Callable[[ParamGroups], torch.optim.Optimizer]


class GradReducer(Protocol):
    """What a deferred :class:`PerLayerOptimizer` needs from a gradient all-reduce (``LayerGradSync``)."""

    def launch(self, k: int) -> None: ...  # layer k's gradients are complete: start averaging them

    def ready(self, k: int) -> bool: ...  # are layer k's averaged gradients in place? (never blocks)

    def wait(self, k: int) -> None: ...  # block until they are

    def done(self, k: int) -> None: ...  # layer k has stepped


def layer_param_groups(lm: nn.Module, groups: Optional[Sequence[Mapping[str, Any]]] = None) -> List[ParamGroups]:
    """Per local layer, the param groups restricted to that layer's parameters (its own and its aux net's).

    ``groups`` are optimizer param groups over the whole LocalModel (default: ``lm.parameter_groups()``); each
    group's settings (lr, weight decay, name) carry over. Parameters shared by two layers (tied weights) are
    refused: stepping them per layer would update them before every gradient has arrived.
    """
    num_layers = len(lm.layers)
    owner: Dict[int, int] = {}
    for k in range(num_layers):
        for p in lm.local_parameters(k):
            if p.requires_grad and owner.setdefault(id(p), k) != k:
                raise ValueError(
                    f"a parameter is shared by local layers {owner[id(p)]} and {k} (tied weights): stepping it per "
                    "layer would update it before every gradient has arrived; use one optimizer for the whole model"
                )
    per_layer: List[ParamGroups] = [[] for _ in range(num_layers)]
    for group in groups if groups is not None else lm.parameter_groups():
        split: List[List[nn.Parameter]] = [[] for _ in range(num_layers)]
        for p in group["params"]:
            if p.requires_grad and id(p) in owner:
                split[owner[id(p)]].append(p)
        for k, params in enumerate(split):
            if params:
                per_layer[k].append({**group, "params": params})
    return per_layer


class PerLayerOptimizer:
    """One optimizer per local layer, stepped by :meth:`after_backward` (pass it to ``local_step``).

    ``make`` builds an optimizer from param groups, e.g. ``lambda g: timm.optim.create_optimizer_v2(g, "sgd")``.
    ``before_step(k, params)`` runs between the backward and the step (gradient all-reduce, clipping,
    unscaling); ``on_release(params)`` after the gradients are dropped. With a ``scaler`` (fp16) each layer's
    step goes through ``scaler.step``; call ``scaler.update()`` once per batch as usual. With a ``reducer``
    each layer's step waits for its gradient all-reduce (see the module docstring); call :meth:`finish` after
    the last layer's backward.
    """

    def __init__(
        self,
        lm: nn.Module,
        make: OptimizerFactory,
        *,
        groups: Optional[Sequence[Mapping[str, Any]]] = None,
        before_step: Optional[Callable[[int, List[nn.Parameter]], None]] = None,
        on_release: Optional[Callable[[List[nn.Parameter]], None]] = None,
        scaler: Optional["torch.amp.GradScaler"] = None,
        reducer: Optional[GradReducer] = None,
    ):
        self.layer_groups = layer_param_groups(lm, groups)
        self.params = [[p for g in groups_k for p in g["params"]] for groups_k in self.layer_groups]
        self.optimizers = [make(groups_k) if groups_k else None for groups_k in self.layer_groups]
        self.before_step = before_step
        self.on_release = on_release
        self.scaler = scaler
        self.reducer = reducer
        self._pending: Deque[int] = deque()  # layers whose all-reduce is in flight, in backward order

    @property
    def param_groups(self) -> ParamGroups:
        """Every layer's param groups, the same dicts the layer optimizers hold (schedulers set their lr)."""
        return [g for opt in self.optimizers if opt is not None for g in opt.param_groups]

    @property
    def defaults(self) -> Dict[str, Any]:
        first = next((opt for opt in self.optimizers if opt is not None), None)
        return dict(first.defaults) if first is not None else {}

    def after_backward(self, k: int) -> None:
        """Step layer ``k``'s optimizer and drop its gradients (layer ``k`` and its aux net have them all).

        With a reducer: start averaging layer ``k``'s gradients, and step the earlier layers whose averages
        have arrived (without waiting for the others).
        """
        if self.reducer is None:
            self._step_layer(k)
            return
        self.reducer.launch(k)
        self._pending.append(k)
        self._step_arrived(block=False)

    def finish(self) -> None:
        """End of the batch: wait for the layers still being averaged and step them (no-op without a reducer)."""
        self._step_arrived(block=True)

    def _step_arrived(self, *, block: bool) -> None:
        # In order: a layer never steps before the ones whose backward ended earlier (same result, any timing).
        while self._pending:
            k = self._pending[0]
            if block:
                self.reducer.wait(k)
            elif not self.reducer.ready(k):
                return
            self._pending.popleft()
            self.reducer.done(k)
            self._step_layer(k)

    def _step_layer(self, k: int) -> None:
        params = self.params[k]
        if self.before_step is not None:
            self.before_step(k, params)
        opt = self.optimizers[k]
        if opt is not None:
            if self.scaler is not None:
                self.scaler.step(opt)
            else:
                opt.step()
        for p in params:
            p.grad = None
        if self.on_release is not None:
            self.on_release(params)

    def step(self, closure: Any = None) -> None:
        """Every layer steps in :meth:`after_backward`; stepping again here would apply its update twice."""
        raise RuntimeError("PerLayerOptimizer steps each layer in after_backward(k); pass "
                           "after_backward=optimizer.after_backward to local_step instead of calling step()")

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            if opt is not None:
                opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> Dict[str, Any]:
        return {"per_layer": [opt.state_dict() if opt is not None else None for opt in self.optimizers]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("per_layer") if isinstance(state, Mapping) else None
        if saved is None or len(saved) != len(self.optimizers):
            raise ValueError(
                f"this optimizer state is not a per-layer state for {len(self.optimizers)} local layers (was it "
                "written by one optimizer over the whole model, or for another K?); resume with the same settings")
        for opt, sd in zip(self.optimizers, saved):
            if opt is not None:
                opt.load_state_dict(sd)

    def __repr__(self) -> str:
        kinds = {type(o).__name__ for o in self.optimizers if o is not None}
        return f"PerLayerOptimizer({len(self.optimizers)} layers, {', '.join(sorted(kinds))})"
