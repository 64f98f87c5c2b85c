"""auglocal-fx: turn any PyTorch vision model into an AugLocal supervised local learning model.

The names below are imported on first use (PEP 562), so that ``import auglocal_fx.cli`` (``auglocal --help``,
``--version``) does not pay for importing torch. ``auglocal_fx.convert`` and ``auglocal_fx.train`` are the
functions, as they always were, even after their submodules of the same name are imported.
"""
import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "register_leaf_function": "._registry",
    "register_leaf_module": "._registry",
    "register_size_function": "._registry",
    "ModelInspection": ".convert",
    "apply_plan": ".convert",
    "convert": ".convert",
    "inspect_model": ".convert",
    "ConversionError": ".errors",
    "PlanMismatchError": ".errors",
    "TraceError": ".errors",
    "create_model": ".hub",
    "ArtifactError": ".io",
    "load": ".io",
    "save": ".io",
    "LocalModel": ".local_model",
    "Plan": ".plan",
    "PerLayerOptimizer": ".optim",
    "CheckpointedBP": ".checkpointing",
    "Rule": ".rules",
    "get_rule": ".rules",
    "list_rules": ".rules",
    "register_rule": ".rules",
    "depth_schedule": ".schedule",
    "select_aux_units": ".schedule",
    "train": ".train",
}

__all__ = [
    "convert",
    "apply_plan",
    "inspect_model",
    "LocalModel",
    "Plan",
    "ModelInspection",
    "PerLayerOptimizer",
    "CheckpointedBP",
    "Rule",
    "register_rule",
    "get_rule",
    "list_rules",
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


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    else:
        try:  # a submodule not imported yet (auglocal_fx.hub.create_model, auglocal_fx.zoo, ...)
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    setattr(sys.modules[__name__], name, value)
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    # Importing submodule ``auglocal_fx.convert`` (or ``.train``) makes the import system bind it as the package
    # attribute of the same name; keep the function there instead, as the eager package did.
    def __setattr__(self, name: str, value) -> None:
        if (
            isinstance(value, types.ModuleType)
            and value.__name__ == f"{__name__}.{name}"
            and _EXPORTS.get(name) == f".{name}"
        ):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
