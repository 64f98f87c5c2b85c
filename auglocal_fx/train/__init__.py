"""Training: recipes (YAML, validated field by field) and the engine that runs them.

Example::

    from auglocal_fx.train import load_recipe, train
    result = train("quickstart")                        # a shipped recipe, or a path to a YAML file
    print(result["auglocal"].top1, result["bp"].top1)
    recipe = load_recipe("fashion_mnist", overrides=["epochs=2"])

(``auglocal_fx.train`` is also the function itself once ``auglocal_fx`` exports it: import names from this
package with ``from auglocal_fx.train import ...``.)
"""
from ._engine import ARTIFACT_DIR, CHECKPOINT_FILE, RunResult, TrainError, TrainResult, train
from ._recipe import (BACKPROP, ConvertSpec, DataSpec, ModelSpec, OptimizerSpec, Recipe, RecipeError, ScheduleSpec,
                      known_rules, list_recipes, load_recipe, parse_overrides)

__all__ = [
    "train", "load_recipe", "Recipe", "RecipeError", "TrainError", "TrainResult", "RunResult", "list_recipes",
    "parse_overrides", "ModelSpec", "ConvertSpec", "DataSpec", "OptimizerSpec", "ScheduleSpec", "BACKPROP",
    "known_rules", "CHECKPOINT_FILE", "ARTIFACT_DIR",
]
