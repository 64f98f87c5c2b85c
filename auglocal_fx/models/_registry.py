"""A small model registry for the architectures auglocal-fx ships itself (the paper's CIFAR ResNets).

timm and torchvision keep their own registries; this one only holds models that neither has, so that
``auglocal_fx.create_model("resnet32")`` and the ``auglocal`` command line can build them by name.

Example::

    @register_model
    def resnet32(*, num_classes: int = 10, **kwargs) -> nn.Module:
        return CifarResNet(depth=32, num_classes=num_classes, **kwargs)

    model = create_registered_model("resnet32", num_classes=100)
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Dict, List, Optional

import torch.nn as nn

__all__ = ["register_model", "list_models", "is_model", "get_model_factory", "create_registered_model"]

_model_factories: Dict[str, Callable[..., nn.Module]] = {}


def register_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``factory`` under its function name."""
    name = factory.__name__
    if name in _model_factories and _model_factories[name] is not factory:
        raise ValueError(f"a model named {name!r} is already registered with auglocal_fx.models")
    _model_factories[name] = factory
    return factory


def list_models(pattern: Optional[str] = None) -> List[str]:
    """Sorted names of the registered models, optionally filtered by a glob ``pattern``."""
    names = sorted(_model_factories)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def is_model(name: str) -> bool:
    return name in _model_factories


def get_model_factory(name: str) -> Callable[..., nn.Module]:
    try:
        return _model_factories[name]
    except KeyError:
        raise ValueError(
            f"unknown auglocal_fx model {name!r}; registered models: {', '.join(list_models()) or '(none)'}"
        ) from None


def create_registered_model(name: str, **kwargs) -> nn.Module:
    return get_model_factory(name)(**kwargs)
