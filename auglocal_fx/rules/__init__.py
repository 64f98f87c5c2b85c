"""Local-learning rules: how each hidden layer's aux net is built and how its local loss is computed.

``auglocal`` (the default), ``dgl``, ``predsim``, ``infopro`` and ``greedy`` are registered here, one file each;
``register_rule`` adds your own (see :mod:`auglocal_fx.rules._base` for a worked example).

Example::

    lm = auglocal_fx.convert(model, layers=8, rule="infopro", rule_options={"x1": 5.0})
    auglocal_fx.rules.list_rules()      # ['auglocal', 'dgl', 'greedy', 'infopro', 'predsim']
"""
from ._base import (DEFAULT_RULE, BuildContext, LossContext, PlanContext, Rule, count_module, get_rule,
                    list_rules, loss_weights, register_rule)
from . import auglocal, dgl, greedy, infopro, predsim  # noqa: F401  (each registers its rule)
from .dgl import DGL
from .greedy import Greedy
from .infopro import InfoPro
from .predsim import PredSim

__all__ = [
    "Rule", "PlanContext", "BuildContext", "LossContext", "register_rule", "get_rule", "list_rules",
    "loss_weights", "count_module", "DEFAULT_RULE", "DGL", "Greedy", "InfoPro", "PredSim",
]
