"""Parsers of the command line's option values, and the click callback that turns their errors into usage errors."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import click

__all__ = ["parse_input_size", "parse_cuts", "parse_int_list", "parse_rule_options", "option_callback",
           "rule_choice_options"]


def parse_input_size(value: Optional[str]) -> Optional[Tuple[int, int, int]]:
    """``"3,224,224"`` (or ``3x224x224``) -> ``(3, 224, 224)``; ``None`` stays ``None``."""
    if value is None:
        return None
    parts = [p.strip() for p in value.replace("x", ",").split(",")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or any(d <= 0 for d in dims):
        raise ValueError(f"expected C,H,W as three positive integers such as 3,224,224, got {value!r}")
    return dims  # type: ignore[return-value]


def parse_cuts(value: Optional[str]) -> Optional[List[str]]:
    """``"layer1.2,layer3.5"`` -> ``["layer1.2", "layer3.5"]``."""
    if value is None:
        return None
    cuts = [c.strip() for c in value.split(",")]
    if not cuts or any(not c for c in cuts):
        raise ValueError(f"expected comma-separated node names such as layer2,layer3, got {value!r}")
    return cuts


def parse_int_list(value: Optional[str]) -> Optional[List[int]]:
    """``"2,4,8"`` -> ``[2, 4, 8]`` (positive integers)."""
    if value is None:
        return None
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        items = []
    if not items or any(v < 1 for v in items):
        raise ValueError(f"expected positive integers separated by commas, such as 2,4,8; got {value!r}")
    return items


def parse_rule_options(values: Tuple[str, ...]) -> Dict[str, Any]:
    """``("x1=5", "y1=0.05")`` -> ``{"x1": 5, "y1": 0.05}`` (values read as YAML scalars)."""
    import yaml

    options: Dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected NAME=VALUE such as x1=5.0, got {item!r}")
        try:
            options[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ValueError(f"cannot read the value of {item!r}; write a number, true/false or a word") from None
    return options


def option_callback(parse: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, Optional[str]], Any]:
    """A click callback that parses an option's value with ``parse``; a ValueError becomes a usage error (exit 2)
    naming the option."""

    def callback(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Any:
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return callback


def rule_choice_options(*, default: Optional[str]) -> Callable[[Callable], Callable]:
    """``--rule NAME`` and ``--rule-option NAME=VALUE`` (repeatable), shared by ``convert`` and ``bench``. The rule
    name is checked by the library (one line naming the accepted rules), so that ``--help`` imports no torch."""

    def callback(ctx: click.Context, param: click.Parameter, values: Tuple[str, ...]) -> Dict[str, Any]:
        try:
            return parse_rule_options(values)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    def decorate(func: Callable) -> Callable:
        func = click.option("--rule-option", "rule_option", multiple=True, metavar="NAME=VALUE", callback=callback,
                            help="An option of the rule, e.g. --rule-option x1=5 (repeatable; see docs/rules.md)."
                            )(func)
        return click.option("--rule", default=default, show_default=default is not None, metavar="NAME",
                            help="Local-learning rule that builds the aux nets and losses: auglocal, dgl, predsim, "
                                 "infopro, greedy, or one added with auglocal_fx.register_rule.")(func)

    return decorate

