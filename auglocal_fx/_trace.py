"""Step 1 of the pipeline: trace a model into a ``torch.fx.GraphModule``.

The tracer keeps leaf modules whole (torch.nn layers, the leaf registries, classes whose ``forward`` reads
``self.training``, and names the user gives). When tracing fails inside a submodule (data-dependent control flow,
iteration over a Proxy, ...), the innermost module being traced at the moment of failure is made a leaf and the
trace is retried; the modules that became leaves this way are reported.

The model is traced in evaluation mode so that training-only outputs (Inception's aux logits, a distillation
head) are left out of the graph; modules whose behaviour depends on the mode are leaves and keep it.

Example::

    traced = trace_model(torchvision.models.resnet18())
    traced.graph_module          # GraphModule whose submodules are the model's own
    traced.auto_leaves           # [] -- nothing needed a retry
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch.fx as fx
import torch.nn as nn

from ._registry import forward_reads_training_flag, get_leaf_functions, get_leaf_modules
from .errors import TraceError

__all__ = ["TracedModel", "trace_model"]

_MAX_RETRIES = 64


@dataclass
class TracedModel:
    graph_module: fx.GraphModule
    model: nn.Module
    leaf_names: List[str] = field(default_factory=list)  # all qualified names forced to be leaves
    auto_leaves: List[str] = field(default_factory=list)  # the ones added because tracing failed inside them


class _LocalTracer(fx.Tracer):
    def __init__(self, *, leaf_types: Sequence[type], leaf_names: Sequence[str]):
        super().__init__(autowrap_functions=tuple(get_leaf_functions()), param_shapes_constant=True)
        self._leaf_types = tuple(leaf_types)
        self._leaf_names = set(leaf_names)
        self.failed_module: Optional[str] = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if module_qualified_name and forward_reads_training_flag(type(m)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The first handler to see the exception is the innermost module being traced.
            if self.failed_module is None:
                self.failed_module = self.path_of_module(m)
            raise


def _resolve_leaf_types(leaf_modules: Optional[Sequence[Any]], model: nn.Module) -> tuple:
    """Split the user's ``leaf_modules`` into classes and qualified module names."""
    types: List[type] = []
    names: List[str] = []
    class_by_name = {type(m).__name__: type(m) for m in model.modules()}
    for item in leaf_modules or ():
        if isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        elif isinstance(item, str) and item in class_by_name:
            types.append(class_by_name[item])
        elif isinstance(item, str):
            try:
                model.get_submodule(item)
            except AttributeError:
                raise TraceError(
                    f"leaf module {item!r} is neither a module class used by the model nor a submodule name; "
                    f"pass a class, a class name such as {next(iter(class_by_name))!r}, or a name from model.named_modules()"
                ) from None
            names.append(item)
        else:
            raise TypeError(f"leaf_modules entries must be nn.Module classes or strings, got {item!r}")
    return tuple(types), names


def _concrete_args(model: nn.Module) -> Dict[str, Any]:
    """Pin every forward argument after the first to its default, so the graph has exactly one input."""
    params = list(inspect.signature(model.forward).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional:
        raise TraceError("the model's forward takes no positional input; auglocal-fx needs forward(x)")
    concrete = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise TraceError(
                f"forward() has a second required argument {p.name!r}; auglocal-fx converts models called as "
                "model(images). Wrap the model in a module whose forward takes only the images."
            )
        concrete[p.name] = p.default
    return concrete


def trace_model(model: nn.Module, *, leaf_modules: Optional[Sequence[Any]] = None) -> TracedModel:
    """Symbolically trace ``model`` (in eval mode, restored afterwards), retrying with failing submodules as leaves."""
    leaf_types, leaf_names = _resolve_leaf_types(leaf_modules, model)
    leaf_types = tuple(get_leaf_modules()) + leaf_types
    concrete = _concrete_args(model)
    auto_leaves: List[str] = []
    was_training = model.training
    model.eval()
    try:
        for _ in range(_MAX_RETRIES):
            tracer = _LocalTracer(leaf_types=leaf_types, leaf_names=leaf_names + auto_leaves)
            try:
                graph = tracer.trace(model, concrete_args=concrete or None)
                break
            except Exception as exc:  # fx raises many kinds (TraceError, TypeError, RuntimeError...)
                failed = tracer.failed_module
                if not failed or failed in auto_leaves:
                    where = f"in submodule {failed!r}" if failed else "in the model's own forward()"
                    raise TraceError(
                        f"torch.fx cannot trace {type(model).__name__} ({where}): {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}. Fix: make the offending code a leaf module "
                        "(leaf_modules=[...] / --leaf CLASS, or auglocal_fx.register_leaf_module), or move "
                        "data-dependent control flow into a submodule."
                    ) from exc
                auto_leaves.append(failed)
        else:
            raise TraceError(f"tracing {type(model).__name__} still fails after {_MAX_RETRIES} leaf retries")
    finally:
        model.train(was_training)
    _drop_pinned_inputs(graph)
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    return TracedModel(graph_module=gm, model=model, leaf_names=leaf_names + auto_leaves, auto_leaves=auto_leaves)


def _drop_pinned_inputs(graph: fx.Graph) -> None:
    """Remove the placeholders of pinned arguments and fx's checks on them: the graph keeps one input.

    fx keeps a pinned argument as a placeholder guarded by ``_assert_is_none`` / ``torch._assert`` nodes; those
    checks (everything computed from pinned arguments alone) feed nothing else and are dropped.
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    pinned = set(placeholders[1:])
    dependent = set(pinned)
    for node in graph.nodes:
        if node.op not in ("placeholder", "output") and node.all_input_nodes and all(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    escapes = [n for n in dependent if any(u not in dependent for u in n.users)]
    if escapes:
        raise TraceError(
            "the model's forward uses its extra arguments in the computation; auglocal-fx converts model(images) "
            "only: wrap the model in a module whose forward takes the images alone"
        )
    for node in reversed(list(graph.nodes)):
        if node in dependent:
            graph.erase_node(node)
