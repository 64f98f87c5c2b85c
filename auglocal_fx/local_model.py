"""The converted model: K local layers trained by their own aux nets.

``forward`` runs the local layers only and returns exactly what the original model returns. ``local_step``
trains with the plan's rule (AugLocal by default): for each layer, forward, local loss, backward through that
layer and its aux net alone, then ``detach`` before the next layer, so each layer's graph is freed before the next
one is built and no gradient crosses a layer boundary. The last layer ends with the model's own head and the task
loss. ``train_layer(k, ...)`` is that step for one layer, the unit the distributed trainers schedule.

Example::

    lm = auglocal_fx.convert(torchvision.models.resnet18(num_classes=10), layers=9, input_size=(3, 32, 32))
    optimizer = torch.optim.SGD(lm.parameters(), lr=0.1)
    optimizer.zero_grad()
    losses = lm.local_step(images, labels)      # 9 losses: 8 aux losses and the head's
    optimizer.step()
    backbone = lm.export()                      # a torchvision ResNet with the trained weights
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .plan import Plan
from .rules import LossContext, Rule, get_rule
from .summary import format_table

__all__ = ["LocalModel"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LocalModel(nn.Module):
    layers: nn.ModuleList
    aux: nn.ModuleList

    def __init__(self, layers: List[fx.GraphModule], aux: List[nn.Module], plan: Plan, source_model: nn.Module):
        super().__init__()
        if len(aux) != len(layers) - 1:
            raise ValueError(f"{len(layers)} local layers need {len(layers) - 1} aux nets, got {len(aux)}")
        self.layers = nn.ModuleList(layers)
        self.aux = nn.ModuleList(aux)
        self.plan = plan
        self.rule: Rule = get_rule(plan.config.get("rule", "auglocal"))
        # Not registered as a submodule: its modules are the layers' own (shared), and registering it would list
        # every parameter twice in state_dict().
        self.__dict__["_source_model"] = source_model

    # -- the original model -------------------------------------------------------------------------------
    @property
    def source_model(self) -> nn.Module:
        """The (private copy of the) original model; it shares its parameters with ``self.layers``."""
        return self.__dict__["_source_model"]

    def backbone_state_dict(self) -> Dict[str, torch.Tensor]:
        """The trained backbone under the original model's state_dict keys (taken from the layers)."""
        state = {}
        for layer in self.layers:
            state.update(layer.state_dict())
        return state

    def export(self) -> nn.Module:
        """A new module of the original architecture carrying the trained weights."""
        model = copy.deepcopy(self.source_model)
        result = model.load_state_dict(self.backbone_state_dict(), strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"export found keys the original model does not have: {result.unexpected_keys[:5]}")
        return model

    # -- parameters ---------------------------------------------------------------------------------------
    def backbone_parameters(self) -> List[nn.Parameter]:
        return list(self.layers.parameters())

    def aux_parameters(self) -> List[nn.Parameter]:
        return list(self.aux.parameters())

    def local_parameters(self, k: int) -> List[nn.Parameter]:
        """Parameters trained by layer ``k``'s loss: the layer's own and its aux net's (the head's for the last)."""
        params = list(self.layers[k].parameters())
        if k < len(self.aux):
            params += list(self.aux[k].parameters())
        return params

    def parameter_groups(self) -> List[Dict]:
        """Backbone and aux parameters as optimizer parameter groups (each may get its own lr, decay...)."""
        return [{"name": "backbone", "params": self.backbone_parameters()}, {"name": "aux", "params": self.aux_parameters()}]

    # -- running ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def train_layer(
        self,
        k: int,
        x: torch.Tensor,
        target: torch.Tensor,
        loss_fn: Optional[LossFn] = None,
        *,
        scaler: Optional["torch.amp.GradScaler"] = None,
        inputs: Optional[torch.Tensor] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Train layer ``k`` on its input ``x``: forward, local loss, backward. Returns (output, loss), detached.

        The output is what layer ``k+1`` takes; no gradient reaches ``x``. Layers ``0..K-2`` learn from their aux
        net through the rule's loss; the last layer from the model's head and ``loss_fn`` (cross-entropy by
        default). ``inputs`` (the network's input batch), ``mean`` and ``std`` (its normalisation) are read by
        rules whose loss reconstructs the image (``self.rule.needs_input``).
        """
        loss_fn = loss_fn or F.cross_entropy
        out = self.layers[k](x)
        if k == len(self.layers) - 1:
            loss = loss_fn(out, target)
        else:
            context = LossContext(layer=k, num_layers=len(self.layers), loss_fn=loss_fn,
                                  options=self.plan.config.get("rule_options") or {}, inputs=inputs, mean=mean,
                                  std=std)
            loss = self.rule.loss(self.aux[k], out, target, context)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return out.detach(), loss.detach()

    def local_step(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        loss_fn: Optional[LossFn] = None,
        *,
        scaler: Optional["torch.amp.GradScaler"] = None,
        after_backward: Optional[Callable[[int], None]] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ) -> List[torch.Tensor]:
        """One local-learning step: per-layer forward, local loss and backward. Returns K detached losses.

        Gradients accumulate into ``.grad`` as usual: zero them before and step the optimizer after (or in
        ``after_backward(k)``, called once layer ``k`` and its aux net have their gradients; see
        :class:`auglocal_fx.PerLayerOptimizer`). ``mean`` and ``std`` are the input normalisation, needed by
        rules that reconstruct the input (InfoPro).
        """
        inputs = x if self.rule.needs_input else None
        losses = []
        for k in range(len(self.layers)):
            # x becomes the detached output: nothing flows back into layer k from layer k+1
            x, loss = self.train_layer(k, x, target, loss_fn, scaler=scaler, inputs=inputs, mean=mean, std=std)
            losses.append(loss)
            if after_backward is not None:
                after_backward(k)
        return losses

    def bp_step(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        loss_fn: Optional[LossFn] = None,
        *,
        scaler: Optional["torch.amp.GradScaler"] = None,
    ) -> torch.Tensor:
        """One end-to-end backprop step through the same layers (the baseline AugLocal is compared with)."""
        loss = (loss_fn or F.cross_entropy)(self(x), target)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach()

    @torch.no_grad()
    def layerwise_logits(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Logits of every layer: its aux net's for layers 0..K-2, the model's head for the last."""
        outputs = []
        last = len(self.layers) - 1
        for k, layer in enumerate(self.layers):
            x = layer(x)
            outputs.append(x if k == last else self.aux[k](x))
        return outputs

    # -- reporting ----------------------------------------------------------------------------------------
    def summary_rows(self) -> List[Dict]:
        plan = self.plan
        rows = []
        for layer in plan.layers:
            aux = plan.aux[layer.index] if layer.index < len(plan.aux) else None
            units = [plan.units[i].name for i in layer.units]
            rows.append(
                {
                    "layer": layer.index,
                    "units": units + (["head"] if aux is None else []),
                    "params": layer.params,
                    "flops": layer.flops,
                    "out_shape": layer.out_shape,
                    **self._aux_columns(aux),
                    "aux_params": aux.params if aux else None,
                    "aux_flops": aux.flops if aux else None,
                }
            )
        return rows

    def _aux_columns(self, aux) -> Dict:
        if self.rule.name == "auglocal":
            return {"aux_depth": aux.depth if aux else None, "aux_units": aux.units if aux else None,
                    "aux_adapters": sum(a is not None for a in aux.adapters) if aux else None}
        return {"aux_net": self.rule.describe(aux) if aux else None}

    def summary(self) -> str:
        text = format_table(self.summary_rows(), title=_title(self.plan))
        leaves = self.plan.trace.get("auto_leaves")
        if leaves:
            text += f"\nkept whole because torch.fx could not trace them: {', '.join(leaves)}"
        return text

    def extra_repr(self) -> str:
        return f"layers={self.plan.num_layers}, units={self.plan.num_units}"


def _title(plan: Plan) -> str:
    c = plan.config
    rule = c.get("rule", "auglocal")
    if rule == "auglocal":
        settings = f"aux_depth={c['aux_depth']}, pyramid={c['pyramid']}, aux_init={c['aux_init']}"
    else:
        settings = ", ".join(f"{k}={v}" for k, v in (c.get("rule_options") or {}).items()) or "default options"
    return (f"{'AugLocal' if rule == 'auglocal' else rule}: {plan.num_layers} local layers over {plan.num_units} units, {settings}, "
            f"input {tuple(c['input_size'])}")
