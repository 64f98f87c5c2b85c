"""auglocal-fx: turn any PyTorch vision model into an AugLocal supervised local learning model."""
from ._registry import register_leaf_function, register_leaf_module, register_size_function
from .convert import ModelInspection, apply_plan, convert, inspect_model
from .errors import ConversionError, PlanMismatchError, TraceError
from .hub import create_model
from .io import ArtifactError, load, save
from .local_model import LocalModel
from .plan import Plan
from .schedule import depth_schedule, select_aux_units
from .train import train

__version__ = "0.1.0"

__all__ = [
    "convert",
    "apply_plan",
    "inspect_model",
    "LocalModel",
    "Plan",
    "ModelInspection",
    "depth_schedule",
    "select_aux_units",
    "register_leaf_module",
    "register_leaf_function",
    "register_size_function",
    "ConversionError",
    "TraceError",
    "PlanMismatchError",
    "ArtifactError",
    "create_model",
    "save",
    "load",
    "train",
    "__version__",
]
