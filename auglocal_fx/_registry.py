"""Registries of modules that torch.fx must not trace through (they become single ``call_module`` nodes).

Like timm's ``register_notrace_module``: a module class is kept whole when its ``forward`` has data-dependent
control flow, or when it behaves differently in training and evaluation (``self.training`` branches would be
frozen at trace time otherwise). timm's own notrace registries are consulted too.

Example::

    @auglocal_fx.register_leaf_module
    class MyDynamicBlock(nn.Module):
        def forward(self, x):
            if x.sum() > 0:        # data-dependent: cannot be traced
                ...
"""
from __future__ import annotations

import importlib
import inspect
import sys
from functools import lru_cache
from typing import Callable, Dict, FrozenSet, Optional, Sequence, Set, Tuple, Type

import torch.nn as nn

__all__ = [
    "register_leaf_module",
    "get_leaf_modules",
    "register_leaf_function",
    "get_leaf_functions",
    "register_size_function",
    "get_size_outputs",
]

_leaf_modules: Set[Type[nn.Module]] = set()
_leaf_functions: Set[Callable] = set()
_size_functions: Dict[Callable, FrozenSet[int]] = {}
# timm functions (module, name) whose listed outputs are sizes; looked up only in modules already imported.
_TIMM_SIZE_FUNCTIONS = (("timm.models.mvitv2", "reshape_post_pool", (1,)),)


def register_leaf_module(module_class: Type[nn.Module]) -> Type[nn.Module]:
    """Class decorator: auglocal-fx keeps instances of ``module_class`` as single graph nodes."""
    if not (isinstance(module_class, type) and issubclass(module_class, nn.Module)):
        raise TypeError(f"register_leaf_module expects an nn.Module subclass, got {module_class!r}")
    _leaf_modules.add(module_class)
    return module_class


def register_leaf_function(fn: Callable) -> Callable:
    """Decorator: calls of ``fn`` are recorded as one ``call_function`` node instead of being traced."""
    _leaf_functions.add(fn)
    return fn


def register_size_function(fn: Optional[Callable] = None, *, outputs: Sequence[int] = (1,)):
    """Declare that the leaf function ``fn`` returns a tuple whose items at ``outputs`` depend only on the sizes of
    its tensor arguments, never on their values or batch size: the ``feat_size`` that a function returns next to
    the tensor it reshapes. Those items then do not cross a cut: a layer that reads one gets its value at the
    example input, and checks that its own input has the example's shape. Without this, such a value is data and
    every block boundary that it crosses is not a valid cut. Use as ``@register_size_function`` (outputs (1,)) or
    ``register_size_function(fn, outputs=(1, 2))``; ``fn`` must be a leaf function (registered with
    :func:`register_leaf_function` or timm's ``register_notrace_function``).

    Example::

        @auglocal_fx.register_size_function
        @auglocal_fx.register_leaf_function
        def pool_tokens(x, size):
            x = F.avg_pool2d(x.transpose(1, 2).unflatten(2, size), 2)
            return x.flatten(2).transpose(1, 2), [x.shape[2], x.shape[3]]
    """

    def register(function: Callable) -> Callable:
        indices = frozenset(int(i) for i in outputs)
        if not callable(function) or not indices:
            raise TypeError(
                f"register_size_function expects a function and output indices, got {function!r}, {outputs!r}"
            )
        _size_functions[function] = indices
        return function

    return register(fn) if fn is not None else register


def get_size_outputs(fn: Callable) -> FrozenSet[int]:
    """The output indices of ``fn`` registered as sizes (empty when it is not a size function)."""
    if fn in _size_functions:
        return _size_functions[fn]
    for module_name, name, indices in _TIMM_SIZE_FUNCTIONS:
        module = sys.modules.get(module_name)  # not imported: no model can call its function
        if module is not None and getattr(module, name, None) is fn:
            return frozenset(indices)
    return frozenset()


def _timm_layers():
    """``timm.layers`` if timm has been imported, else None.

    A model that contains timm modules or calls timm functions was built after timm was imported, so when it is
    not in ``sys.modules`` its registries have nothing to say; importing timm (about 0.5 s) would only slow down
    the first conversion of every other model.
    """
    if "timm" not in sys.modules:
        return None
    try:
        return importlib.import_module("timm.layers")
    except ImportError:  # a partial install: trace without timm's registries
        return None


def _default_leaf_modules() -> Tuple[type, ...]:
    import torchvision.ops

    found = [torchvision.ops.StochasticDepth]
    timm_layers = _timm_layers()
    if timm_layers is not None:
        found.append(timm_layers.DropPath)
        found.extend(timm_layers.get_notrace_modules())
    return tuple(found)


def get_leaf_modules() -> FrozenSet[type]:
    """Module classes that are never traced through: registered ones, timm's notrace modules, stochastic depth."""
    return frozenset(_leaf_modules).union(_default_leaf_modules())


def get_leaf_functions() -> FrozenSet[Callable]:
    """Functions recorded as single nodes: registered ones and timm's notrace functions."""
    found: Set[Callable] = set(_leaf_functions)
    timm_layers = _timm_layers()
    if timm_layers is not None:
        found.update(timm_layers.get_notrace_functions())
    return frozenset(found)


@lru_cache(maxsize=None)
def forward_reads_training_flag(module_class: type) -> bool:
    """Whether ``module_class.forward`` branches on ``self.training``.

    Such a module must stay a leaf: tracing would freeze the branch taken at trace time, so a traced
    DropPath or BatchNormAct would behave the same in training and in evaluation.
    """
    if module_class.__module__.startswith("torch.nn"):
        return False  # torch's own modules are leaves already
    try:
        source = inspect.getsource(module_class.forward)
    except (OSError, TypeError):
        return False
    return "self.training" in source
