"""Recipes: every shipped one validates; a bad one fails naming the field and what it accepts."""
import importlib
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from auglocal_fx.train import Recipe, RecipeError, list_recipes, load_recipe, parse_overrides

SHIPPED = ["quickstart", "fashion_mnist", "resnet32_cifar10", "resnet110_cifar10", "resnet34_imagenet",
           "finetune_timm", "compare_fashion_mnist"]
MINIMAL = {"model": {"name": "resnet8"}, "data": {"name": "digits"}}


def _train_command():
    try:
        return importlib.import_module("auglocal_fx.cli.train").train_command
    except ModuleNotFoundError:  # a source checkout that is not pip-installed: cli/ is the package
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        return importlib.import_module("cli.train").train_command


def test_shipped_recipes_are_listed():
    assert set(SHIPPED) <= set(list_recipes())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_validates(name):
    recipe = load_recipe(name)
    assert recipe.name == name and recipe.description
    again = Recipe.from_dict(yaml.safe_load(recipe.to_yaml()))  # round trip through YAML
    assert again == recipe


def test_paper_settings():
    r32, r110, r34 = load_recipe("resnet32_cifar10"), load_recipe("resnet110_cifar10"), load_recipe("resnet34_imagenet")
    for r in (r32, r110):
        assert (r.optimizer.name, r.optimizer.momentum, r.optimizer.weight_decay, r.optimizer.lr) == ("sgd", 0.9, 1e-4, 0.8)
        assert (r.batch_size, r.epochs, r.schedule.name, r.convert.pyramid) == (1024, 400, "cosine", 0.5)
    assert (r32.model.name, r32.convert.layers, r32.convert.aux_depth) == ("resnet32", 16, 2)
    assert (r110.model.name, r110.convert.layers, r110.convert.aux_depth) == ("resnet110", 55, 3)
    assert (r34.convert.layers, r34.convert.aux_depth, r34.convert.pyramid) == (17, 4, 0.0)
    assert (r34.epochs, r34.batch_size, r34.optimizer.lr) == (200, 1024, 0.4)
    assert load_recipe("quickstart").rules == ["auglocal", "bp"]
    assert load_recipe("finetune_timm").convert.aux_init == "copy"


def test_defaults_and_file_loading(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    r = load_recipe(path)
    assert r.name == "mine" and r.rules == ["auglocal"] and r.convert.layers == 4 and r.optimizer.name == "sgd"
    assert load_recipe("quickstart.yaml").name == "quickstart"
    assert load_recipe(dict(MINIMAL, optimizer={"weight_decay": "1e-4"})).optimizer.weight_decay == 1e-4  # YAML 1.1


@pytest.mark.parametrize("patch,field,words", [
    ({"optimiser": {}}, "optimiser", ["not known", "did you mean 'optimizer'"]),
    ({"optimizer": {"lrr": 0.1}}, "optimizer.lrr", ["did you mean 'lr'", "accepted in 'optimizer'"]),
    ({"epochs": "ten"}, "epochs", ["must be an integer >= 1", "'ten'"]),
    ({"epochs": 0}, "epochs", [">= 1"]),
    ({"epochs": True}, "epochs", ["integer"]),
    ({"channels_last": "yes"}, "channels_last", ["true or false"]),
    ({"amp": "fp8"}, "amp", ["one of none, bf16, fp16"]),
    ({"optimizer": {"lr": -1}}, "optimizer.lr", ["> 0.0", "-1"]),
    ({"optimizer": {"name": "adamx"}}, "optimizer.name", ["timm optimizer", "adamax"]),
    ({"model": {}}, "model.name", ["required"]),
    ({"model": "resnet8"}, "model", ["mapping"]),
    ({"rule": "e2e"}, "rule", ["must be one of auglocal, ", ", bp"]),
    ({"rule": ["auglocal", "bp", "bp"]}, "rule", ["twice"]),
    ({"rule": ["auglocal", "hebb"]}, "rule[1]", ["must be one of auglocal, ", ", bp"]),
    ({"convert": {"rule_options": {"hebb": {}}}}, "convert.rule_options", ["not a local rule", "auglocal"]),
    ({"convert": {"rule_options": {"auglocal": {"x1": 1.0}}}}, "convert.rule_options.auglocal",
     ["no option 'x1'"]),
    ({"convert": {"rule_options": {"auglocal": 3}}}, "convert.rule_options.auglocal", ["map option names"]),
    ({"optimizer": {"per_layer": "yes"}}, "optimizer.per_layer", ["true or false"]),
    ({"model": {"name": "resnet8", "pretrained": True, "pretrained_file": "w.pth"}}, "model.pretrained",
     ["set only one"]),
    ({"rule": 3}, "rule", ["string or a list of strings"]),
    ({"device": "gpu"}, "device", ["auto, cpu, cuda"]),
    ({"data": {"name": "mnist"}}, "data.name", ["one of digits", "fashion_mnist"]),
    ({"data": {"name": "cifar10", "auto_augment": "rand-m9"}}, "data.auto_augment", ["augment: rrc"]),
    ({"data": {"name": "cifar10", "mean": [0.1, 0.2]}}, "data.mean", ["1 or 3 values"]),
    ({"data": {"name": "imagenet"}}, "data.root", ["required"]),
    ({"convert": {"layers": 2.5}}, "convert.layers", ["integer"]),
    ({"convert": {"pyramid": 2}}, "convert.pyramid", ["<= 1.0"]),
    ({"convert": {"aux_init": "zeros"}}, "convert.aux_init", ["copy, fresh"]),
    ({"convert": {"input_size": [3, 32]}}, "convert.input_size", ["list of 3"]),
    ({"schedule": {"name": "cosinus"}}, "schedule.name", ["did you mean 'cosine'"]),
    ({"schedule": {"name": "multistep"}}, "schedule.decay_milestones", ["required"]),
    ({"schedule": {"warmup_epochs": 20}}, "schedule.warmup_epochs", ["less than epochs"]),
    ({"model": {"name": "resnet8", "kwargs": [1]}}, "model.kwargs", ["mapping"]),
    ({"amp": "fp16", "device": "cpu"}, "amp", ["bf16 on CPU"]),
])
def test_bad_recipe_names_the_field(patch, field, words):
    data = {**MINIMAL, **patch}
    with pytest.raises(RecipeError) as info:
        load_recipe(data)
    assert info.value.field == field
    message = str(info.value)
    assert f"'{field}'" in message and "\n" not in message
    for word in words:
        assert word in message, message


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe([1, 2])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="shipped: .*quickstart"):
        load_recipe("no_such_recipe")


def test_overrides():
    assert parse_overrides(["optimizer.lr=0.2", "rule=[auglocal, bp]", "data.root=/d:x"]) == {
        "optimizer.lr": 0.2, "rule": ["auglocal", "bp"], "data.root": "/d:x"}
    r = load_recipe("quickstart", overrides=["optimizer.lr=0.2", "rule=bp", "convert.layers=3", "epochs=2"])
    assert (r.optimizer.lr, r.rules, r.convert.layers, r.epochs) == (0.2, ["bp"], 3, 2)
    assert load_recipe(MINIMAL, overrides={"schedule.name": "step"}).schedule.name == "step"
    with pytest.raises(RecipeError) as info:
        load_recipe("quickstart", overrides=["optimizer.lr=fast"])
    assert info.value.field == "optimizer.lr"
    with pytest.raises(RecipeError, match="not a section"):
        load_recipe("quickstart", overrides=["epochs.x=1"])
    for bad in ("lr", "=3", "a..b=1"):
        with pytest.raises(RecipeError, match="key=value"):
            parse_overrides([bad])


def test_cli_exit_codes(tmp_path):
    cmd, runner = _train_command(), CliRunner()
    ok = runner.invoke(cmd, ["quickstart", "--dry-run", "--set", "epochs=2"])
    assert ok.exit_code == 0 and "epochs: 2" in ok.output
    bad_field = runner.invoke(cmd, ["quickstart", "--dry-run", "--set", "optimizer.momentum=2"])
    assert bad_field.exit_code == 1
    assert bad_field.output.strip() == "Error: recipe field 'optimizer.momentum' must be <= 1.0, got 2"
    assert runner.invoke(cmd, ["quickstart", "--set", "epochs"]).exit_code == 2
    assert runner.invoke(cmd, ["no_such_recipe"]).exit_code == 2
    assert runner.invoke(cmd, [str(tmp_path / "missing.yaml")]).exit_code == 2
