"""Architectures shipped with auglocal-fx (the AugLocal paper's CIFAR ResNets) and their registry."""
from ._registry import create_registered_model, get_model_factory, is_model, list_models, register_model
from . import cifar_resnet  # noqa: F401  (registers resnet8/20/32/44/56/110)

__all__ = ["register_model", "list_models", "is_model", "get_model_factory", "create_registered_model"]
