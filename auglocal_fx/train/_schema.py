"""The recipe schema's machinery: dataclass fields that carry their help and checks, and a validator driven by
the type hints, so that every recipe field is checked the same way and every error names its field.

Example::

    @dataclass
    class OptimizerSpec:
        lr: float = spec(0.1, help="base learning rate", gt=0.0)

    build_dataclass(OptimizerSpec, {"lr": -1}, prefix="optimizer")
    # RecipeError: recipe field 'optimizer.lr' must be a number > 0.0, got -1
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import field
from typing import Any, Dict, List, Mapping, Optional, Union

import yaml

__all__ = ["RecipeError", "spec", "build_dataclass", "show_value"]


class RecipeError(ValueError):
    """A recipe that cannot be used; ``field`` is the dotted name of the offending field (or None)."""

    def __init__(self, message: str, *, field: Optional[str] = None) -> None:
        super().__init__(message)
        self.field = field


def spec(default: Any = dataclasses.MISSING, *, help: str, factory: Any = None, **checks: Any) -> Any:
    """A dataclass field carrying its help text and checks (choices, min, gt, max, nonempty)."""
    meta = {"help": help, **checks}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _where(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def build_dataclass(cls: type, data: Any, *, prefix: str) -> Any:
    label = f"recipe field {prefix!r}" if prefix else "a recipe"
    if not isinstance(data, Mapping):
        raise RecipeError(f"{label} must be a mapping of fields, got {show_value(data)}", field=prefix or None)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(
                f"recipe field {_where(prefix, str(key))!r} is not known{hint}; "
                f"accepted{' in ' + repr(prefix) if prefix else ''}: {', '.join(fields)}",
                field=_where(prefix, str(key)),
            )
    kwargs = {}
    for name, f in fields.items():
        where = _where(prefix, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecipeError(f"recipe field {where!r} is required: {f.metadata.get('help', '')}", field=where)
            continue
        kwargs[name] = _coerce(data[name], hints[name], where, f.metadata)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, where: str, meta: Mapping[str, Any]) -> Any:
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, prefix=where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        options = [a for a in args if a is not type(None)]
        if value is None:
            if type(None) in args:
                return None
            raise RecipeError(f"recipe field {where!r} must be set: {_describe(tp, meta)}", field=where)
        errors = []
        for option in options:  # str before list keeps `rule: bp` a string
            try:
                return _coerce(value, option, where, meta)
            except RecipeError as e:
                errors.append((option, e))
        # The error of the option the value was meant for is the useful one (a list for a list field, ...).
        for option, error in errors:
            if len(options) == 1 or (isinstance(value, (list, tuple)) and typing.get_origin(option) in (list, List)):
                raise RecipeError(str(error).replace(" or null", ""), field=error.field) from None
        raise RecipeError(f"recipe field {where!r} must be {_describe(tp, meta)}, got {show_value(value)}", field=where)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"recipe field {where!r} must be {_describe(tp, meta)}, got {show_value(value)}", field=where)
        if "length" in meta and len(value) != meta["length"]:
            raise RecipeError(
                f"recipe field {where!r} must be a list of {meta['length']} values, got {show_value(value)}", field=where)
        (item_tp,) = args
        return [_coerce(v, item_tp, f"{where}[{i}]", {}) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise RecipeError(f"recipe field {where!r} must be a mapping with string keys, got {show_value(value)}",
                              field=where)
        return dict(value)
    if tp is Any:
        return value
    return _check_scalar(_scalar(value, tp, where, meta), where, meta, shown=show_value(value))


def _scalar(value: Any, tp: type, where: str, meta: Mapping[str, Any]) -> Any:
    bad = RecipeError(f"recipe field {where!r} must be {_describe(tp, meta)}, got {show_value(value)}", field=where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `1e-4` (no dot) as a string; accept it as the number it plainly is.
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str) and value:
            return value
        raise bad
    raise TypeError(f"unsupported recipe field type {tp!r} for {where}")  # a bug in the schema itself


def _check_scalar(value: Any, where: str, meta: Mapping[str, Any], *, shown: str) -> Any:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(
            f"recipe field {where!r} must be one of {', '.join(map(str, choices))}; got {shown}{hint}",
            field=where)
    if "min" in meta and value < meta["min"]:
        raise RecipeError(f"recipe field {where!r} must be >= {meta['min']}, got {shown}", field=where)
    if "gt" in meta and value <= meta["gt"]:
        raise RecipeError(f"recipe field {where!r} must be > {meta['gt']}, got {shown}", field=where)
    if "max" in meta and value > meta["max"]:
        raise RecipeError(f"recipe field {where!r} must be <= {meta['max']}, got {shown}", field=where)
    return value


def _describe(tp: Any, meta: Mapping[str, Any]) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        text = " or ".join(_describe(a, meta) for a in args if a is not type(None))
        return text + (" or null" if type(None) in args else "")
    if origin in (list, List):
        plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(args[0], 'values')}"
    if origin in (dict, Dict):
        return "a mapping"
    if "choices" in meta:
        return "one of " + ", ".join(map(str, meta["choices"]))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a non-empty string"}
    text = names.get(tp, getattr(tp, "__name__", str(tp)))
    if tp in (int, float):
        bounds = [f"{op} {meta[key]}" for key, op in (("min", ">="), ("gt", ">"), ("max", "<=")) if key in meta]
        text += (" " + " and ".join(bounds)) if bounds else ""
    return text


def show_value(value: Any) -> str:
    """A short YAML-like rendering of a value for error messages."""
    text = repr(value) if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    if text.endswith("\n...") or text.endswith(" ..."):
        text = text[:-4].strip()
    return text if len(text) <= 60 else text[:57] + "..."
