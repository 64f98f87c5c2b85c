"""The converted model: K local layers trained by their own aux nets.

``forward`` runs the local layers only and returns exactly what the original model returns. ``local_step``
trains with AugLocal: for each layer, forward, aux loss, backward through that layer and its aux net alone, then
``detach`` before the next layer, so each layer's graph is freed before the next one is built and no gradient
crosses a layer boundary. The last layer ends with the model's own head and the task loss.

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
from typing import Callable, Dict, List, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .plan import Plan
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

    def local_step(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        loss_fn: Optional[LossFn] = None,
        *,
        scaler: Optional["torch.amp.GradScaler"] = None,
        after_backward: Optional[Callable[[int], None]] = None,
    ) -> List[torch.Tensor]:
        """One AugLocal training step: per-layer forward, aux loss and backward. Returns K detached losses.

        Gradients accumulate into ``.grad`` as usual: zero them before and step the optimizer after (or in
        ``after_backward(k)``, called once layer ``k`` and its aux net have their gradients).
        """
        loss_fn = loss_fn or F.cross_entropy
        losses = []
        last = len(self.layers) - 1
        for k, layer in enumerate(self.layers):
            out = layer(x)
            logits = out if k == last else self.aux[k](out)
            loss = loss_fn(logits, target)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            losses.append(loss.detach())
            if after_backward is not None:
                after_backward(k)
            if k != last:
                x = out.detach()  # the boundary: nothing flows back into layer k from layer k+1
            del out, logits, loss
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
                    "aux_depth": aux.depth if aux else None,
                    "aux_units": aux.units if aux else None,
                    "aux_adapters": sum(a is not None for a in aux.adapters) if aux else None,
                    "aux_params": aux.params if aux else None,
                    "aux_flops": aux.flops if aux else None,
                }
            )
        return rows

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
    return (
        f"AugLocal: {plan.num_layers} local layers over {plan.num_units} units, aux_depth={c['aux_depth']}, "
        f"pyramid={c['pyramid']}, aux_init={c['aux_init']}, input {tuple(c['input_size'])}"
    )
