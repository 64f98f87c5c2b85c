"""Training recipes: pure data (dataclasses), parsed from YAML and validated field by field.

A recipe says what to train and how; the engine (``_engine.py``) says nothing about what. Every field
is checked when the recipe is loaded, and an error names the field and what it accepts::

    recipe field 'optimizer.lr' must be a number > 0, got -1
    recipe field 'optimiser' is not known (did you mean 'optimizer'?); accepted: model, convert, ...

``--set key=value`` overrides (``optimizer.lr=0.1``, ``rule=[auglocal,bp]``) are applied to the raw
mapping before validation, so that they are checked the same way.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from ._schema import RecipeError, build_dataclass, show_value, spec

__all__ = [
    "RecipeError", "Recipe", "ModelSpec", "ConvertSpec", "DataSpec", "OptimizerSpec", "ScheduleSpec", "ParallelSpec",
    "load_recipe", "parse_overrides", "apply_overrides", "list_recipes", "known_rules", "BACKPROP",
]

BACKPROP = "bp"  # end-to-end backprop through the same layers: the baseline every local rule is compared with


def known_rules() -> List[str]:
    """What ``rule:`` accepts: ``bp`` and every registered local-learning rule (auglocal_fx.rules)."""
    from ..rules import list_rules

    return list_rules() + [BACKPROP]
_AMP = ("none", "bf16", "fp16")
_SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly", "constant", "none")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class ModelSpec:
    name: str = spec(help="model name as auglocal_fx.create_model reads it: resnet32 (auglocal_fx's own), "
                           "timm:NAME, tv:NAME (torchvision), or package.module:factory")
    pretrained_file: Optional[str] = spec(
        None, help="local weights file (.pth/.safetensors) to start from; nothing is downloaded")
    pretrained: bool = spec(False, help="start from the model library's own pretrained weights (timm/torchvision): "
                                         "from its local cache, else downloaded")
    num_classes: Optional[int] = spec(None, help="classifier size; default: the data set's", min=1)
    in_chans: Optional[int] = spec(None, help="input channels; default: the data set's", min=1)
    kwargs: Dict[str, Any] = spec(help="extra keyword arguments for the model constructor", factory=dict)


@dataclass
class ConvertSpec:
    layers: int = spec(4, help="number of local layers K (the paper: one per unit)", min=1)
    aux_depth: int = spec(2, help="base depth d of the aux nets (units copied from the layers above)", min=1)
    pyramid: float = spec(0.5, help="pyramidal depth coefficient tau (0 = same depth for all)", min=0.0, max=1.0)
    aux_init: str = spec("copy", help="aux net initialisation", choices=("copy", "fresh"))
    input_size: Optional[List[int]] = spec(
        None, help="(C, H, W) for tracing; default: from the data (channels, img_size, img_size)", length=3)
    cuts: Optional[List[str]] = spec(None, help="explicit cut node names (overrides the even split)")
    leaf_modules: Optional[List[str]] = spec(None, help="module class names to keep opaque when tracing")
    rule_options: Dict[str, Dict[str, Any]] = spec(
        help="options of each local rule, keyed by rule name, e.g. {infopro: {x1: 5.0}} (see docs/rules.md)",
        factory=dict)


@dataclass
class DataSpec:
    name: str = spec(help="data set", choices=(
        "digits", "fashion_mnist", "cifar10", "cifar100", "svhn", "stl10", "imagenet", "imagefolder"))
    root: Optional[str] = spec(None, help="data folder (default: $AUGLOCAL_DATA or ~/.cache/auglocal_fx/data)")
    download: bool = spec(False, help="download a torchvision data set into root when missing")
    img_size: Optional[int] = spec(None, help="training/eval resolution; default: the data set's own", min=1)
    augment: str = spec("auto", help="training augmentation",
                         choices=("auto", "none", "flip", "crop", "crop_flip", "rrc"))
    auto_augment: Optional[str] = spec(None, help="timm auto-augment policy, e.g. rand-m9-mstd0.5 (augment: rrc)")
    re_prob: float = spec(0.0, help="random erasing probability", min=0.0, max=1.0)
    mean: Optional[List[float]] = spec(None, help="normalisation mean; default: the data set's")
    std: Optional[List[float]] = spec(None, help="normalisation std; default: the data set's")
    interpolation: str = spec("bilinear", help="resize interpolation", choices=("bilinear", "bicubic", "nearest"))
    crop_pct: Optional[float] = spec(None, help="eval centre-crop fraction; default: the data set's", gt=0.0, max=1.0)
    train_subset: Optional[int] = spec(None, help="train on a fixed random subset of this size", min=1)
    eval_subset: Optional[int] = spec(None, help="evaluate on a fixed random subset of this size", min=1)
    num_workers: int = spec(0, help="DataLoader worker processes", min=0)
    pin_memory: Optional[bool] = spec(None, help="pin host memory; default: when training on CUDA")
    train_dir: str = spec("train", help="training sub-folder of root (imagenet/imagefolder)")
    eval_dir: str = spec("val", help="evaluation sub-folder of root (imagenet/imagefolder)")


@dataclass
class OptimizerSpec:
    name: str = spec("sgd", help="timm optimizer name (sgd = SGD with Nesterov momentum, momentum = without, adamw, ...)")
    lr: float = spec(0.1, help="base learning rate", gt=0.0)
    momentum: float = spec(0.9, help="momentum (SGD-like optimizers)", min=0.0, max=1.0)
    weight_decay: float = spec(1e-4, help="weight decay", min=0.0)
    filter_bias_and_bn: bool = spec(True, help="no weight decay on biases and norm weights (timm's default)")
    betas: Optional[List[float]] = spec(None, help="Adam-style betas", length=2)
    eps: Optional[float] = spec(None, help="Adam-style epsilon", gt=0.0)
    per_layer: bool = spec(False, help="one optimizer per local layer, stepped right after that layer's backward "
                                        "(its gradients are dropped at once); the same update as one step per batch")


@dataclass
class ScheduleSpec:
    name: str = spec("cosine", help="timm learning-rate schedule, stepped once per epoch", choices=_SCHEDULES)
    warmup_epochs: int = spec(0, help="linear warm-up epochs", min=0)
    warmup_lr: float = spec(1e-5, help="learning rate at the start of warm-up", min=0.0)
    min_lr: float = spec(0.0, help="floor of the decay", min=0.0)
    decay_epochs: Optional[float] = spec(None, help="step: epochs between decays", gt=0.0)
    decay_milestones: Optional[List[int]] = spec(None, help="multistep: epochs at which to decay")
    decay_rate: float = spec(0.1, help="step/multistep: decay factor", gt=0.0)


@dataclass
class ParallelSpec:
    stages: int = spec(1, help="layer-parallel pipeline stages S: contiguous groups of local layers on S processes "
                                "training S batches at once (the processes / S are data-parallel replicas)", min=1)
    placement: Optional[List[List[int]]] = spec(
        None, help="local layers of each stage, e.g. [[0, 1, 2], [3, 4]]; default: balanced by `balance`")
    balance: str = spec("flops", help="what the default placement balances: the plan's training FLOPs, or the "
                                      "layers' step times measured on rank 0 at start", choices=("flops", "measured"))


@dataclass
class Recipe:
    model: ModelSpec = spec(help="the model to train")
    data: DataSpec = spec(help="the data set")
    convert: ConvertSpec = spec(help="how auglocal_fx.convert splits the model", factory=ConvertSpec)
    optimizer: OptimizerSpec = spec(help="one optimizer over backbone and aux nets", factory=OptimizerSpec)
    schedule: ScheduleSpec = spec(help="learning-rate schedule", factory=ScheduleSpec)
    parallel: ParallelSpec = spec(help="layer-parallel training (pipeline stages)", factory=ParallelSpec)
    rule: Union[str, List[str]] = spec(
        "auglocal", help="a local rule (auglocal, dgl, predsim, infopro, greedy), bp (end-to-end baseline), or a "
                         "list to train each in turn on the same data, seed and budget")
    name: Optional[str] = spec(None, help="run name (default: the recipe file's name)")
    description: Optional[str] = spec(None, help="free text")
    epochs: int = spec(10, help="training epochs", min=1)
    batch_size: int = spec(128, help="training batch size", min=1)
    eval_batch_size: Optional[int] = spec(None, help="evaluation batch size; default: batch_size", min=1)
    amp: str = spec("none", help="automatic mixed precision", choices=_AMP)
    channels_last: bool = spec(False, help="NHWC memory format (faster convs on recent GPUs)")
    compile: bool = spec(False, help="torch.compile each local layer and aux net")
    seed: int = spec(0, help="random seed (model init, data order, augmentation)", min=0)
    deterministic: bool = spec(False, help="deterministic kernels (bit-identical resume on CPU)")
    device: str = spec("auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps")
    num_threads: Optional[int] = spec(
        None, help="CPU threads for torch ops (torch.set_num_threads); default: torch's choice", min=1)
    label_smoothing: float = spec(0.0, help="cross-entropy label smoothing (all losses)", min=0.0, max=1.0)
    grad_clip: Optional[float] = spec(None, help="clip the global gradient norm to this value", gt=0.0)
    eval_every: int = spec(1, help="evaluate every N epochs (and always after the last)", min=1)
    limit_train_batches: Optional[int] = spec(None, help="stop each epoch after N batches (smoke runs)", min=1)
    limit_eval_batches: Optional[int] = spec(None, help="evaluate on the first N batches only", min=1)
    output_dir: Optional[str] = spec(None, help="where runs are written (default: runs/<name>)")
    sync_bn: bool = spec(False, help="data-parallel runs on CUDA: BatchNorm statistics over the global batch "
                                      "(SyncBatchNorm); refused on CPU (gloo)")
    bucket_cap_mb: float = spec(4.0, help="data-parallel runs: gradients of consecutive local layers are averaged "
                                           "in one all-reduce until it holds this many MiB", gt=0.0)
    dist_timeout: float = spec(600.0, help="data-parallel runs: seconds a collective may wait for the other ranks "
                                            "before every rank stops with an error", gt=0.0)

    @property
    def rules(self) -> List[str]:
        """The rules to run, in order (``rule`` as a list)."""
        return [self.rule] if isinstance(self.rule, str) else list(self.rule)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Recipe":
        """Build and validate a recipe from a plain mapping (raises :class:`RecipeError`)."""
        recipe = build_dataclass(cls, data, prefix="")
        _check_recipe(recipe)
        return recipe


def _check_recipe(r: Recipe) -> None:
    """Checks that involve more than one field, or knowledge outside the schema."""
    rules = r.rules
    accepted = known_rules()
    if not rules:
        raise RecipeError(f"recipe field 'rule' must name at least one of {', '.join(accepted)}", field="rule")
    for i, rule in enumerate(rules):
        if rule not in accepted:
            where = "rule" if isinstance(r.rule, str) else f"rule[{i}]"
            raise RecipeError(f"recipe field {where!r} must be one of {', '.join(accepted)}; got {rule!r}", field=where)
    if len(set(rules)) != len(rules):
        raise RecipeError(f"recipe field 'rule' lists a rule twice: {rules}", field="rule")
    _check_rule_options(r.convert.rule_options)
    if r.model.pretrained and r.model.pretrained_file is not None:
        raise RecipeError("recipe fields 'model.pretrained' (the library's weights, fetched) and "
                          "'model.pretrained_file' (a local file) exclude each other: set only one",
                          field="model.pretrained")
    if not _DEVICE_RE.match(r.device):
        raise RecipeError(f"recipe field 'device' must be auto, cpu, cuda, cuda:N or mps; got {r.device!r}",
                          field="device")
    _check_optimizer(r.optimizer.name)
    d = r.data
    if d.auto_augment is not None and d.augment != "rrc":
        raise RecipeError("recipe field 'data.auto_augment' needs data.augment: rrc (timm's ImageNet pipeline); "
                          f"data.augment is {d.augment!r}", field="data.auto_augment")
    for key in ("mean", "std"):
        values = getattr(d, key)
        if values is not None and len(values) not in (1, 3):
            raise RecipeError(f"recipe field 'data.{key}' must list 1 or 3 values (one per channel), got {values}",
                              field=f"data.{key}")
    if d.std is not None and any(s <= 0 for s in d.std):
        raise RecipeError(f"recipe field 'data.std' must be > 0, got {d.std}", field="data.std")
    if d.name in ("imagenet", "imagefolder") and d.root is None:
        raise RecipeError(f"recipe field 'data.root' is required for data.name {d.name!r}: the folder with "
                          f"{d.train_dir}/ and {d.eval_dir}/", field="data.root")
    if r.convert.input_size is not None and any(v < 1 for v in r.convert.input_size):
        raise RecipeError(f"recipe field 'convert.input_size' must be positive (C, H, W), got {r.convert.input_size}",
                          field="convert.input_size")
    s = r.schedule
    if s.warmup_epochs >= r.epochs and s.name != "none" and s.warmup_epochs > 0:
        raise RecipeError(f"recipe field 'schedule.warmup_epochs' ({s.warmup_epochs}) must be less than "
                          f"epochs ({r.epochs})", field="schedule.warmup_epochs")
    if s.name == "multistep" and not s.decay_milestones:
        raise RecipeError("recipe field 'schedule.decay_milestones' is required for schedule.name multistep",
                          field="schedule.decay_milestones")
    _check_parallel(r)
    if r.amp == "fp16" and r.device == "cpu":
        raise RecipeError("recipe field 'amp' fp16 needs a GPU; use bf16 on CPU (or device: auto/cuda)", field="amp")


def _check_parallel(r: Recipe) -> None:
    from ..distributed._placement import PlacementError, check_placement

    p = r.parallel
    if p.placement is not None:
        try:
            check_placement(p.placement, stages=p.stages)
        except PlacementError as exc:
            raise RecipeError(f"recipe field 'parallel.placement': {exc}", field="parallel.placement") from None
    if p.stages > 1 and r.convert.cuts is None and p.stages > r.convert.layers:
        raise RecipeError(f"recipe field 'parallel.stages' ({p.stages}) must be at most convert.layers "
                          f"({r.convert.layers}): every stage trains at least one local layer", field="parallel.stages")


def _check_rule_options(options: Mapping[str, Any]) -> None:
    from ..errors import ConversionError
    from ..rules import get_rule, list_rules

    for name, given in options.items():
        where = f"convert.rule_options.{name}"
        if name not in list_rules():
            raise RecipeError(f"recipe field 'convert.rule_options' has options for {name!r}, which is not a local "
                              f"rule; accepted: {', '.join(list_rules())}", field="convert.rule_options")
        if not isinstance(given, Mapping):
            raise RecipeError(f"recipe field {where!r} must map option names to values, got {given!r}", field=where)
        try:
            get_rule(name).resolve_options(given)
        except ConversionError as exc:
            raise RecipeError(f"recipe field {where!r}: {exc}", field=where) from None


def _check_optimizer(name: str) -> None:
    from timm.optim import list_optimizers

    known = list_optimizers()
    if name.lower() not in known:
        close = difflib.get_close_matches(name.lower(), known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise RecipeError(f"recipe field 'optimizer.name' must be a timm optimizer{hint}; got {name!r} "
                          "(see timm.optim.list_optimizers())", field="optimizer.name")


# --------------------------------------------------------------------------------------------------
# Loading: files, shipped names, overrides.

def list_recipes() -> List[str]:
    """Names of the recipes shipped in ``auglocal_fx.recipes``."""
    return sorted(p.name[:-5] for p in _shipped().iterdir() if p.name.endswith(".yaml"))


def _shipped():
    from importlib.resources import files

    try:
        return files("auglocal_fx.recipes")
    except ModuleNotFoundError:
        # A source checkout that is not installed: recipes/ sits beside the package.
        return Path(__file__).resolve().parents[2] / "recipes"


def _resolve(source: Union[str, Path]) -> Tuple[str, str]:
    """(text, name) of a recipe given as a path or as a shipped name (``quickstart``)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.read_text(), path.stem
    name = str(source)
    if "/" not in name and "\\" not in name:
        stem = name[:-5] if name.endswith(".yaml") else name
        candidate = _shipped() / f"{stem}.yaml"
        if candidate.is_file():
            return candidate.read_text(), stem
    raise RecipeError(
        f"recipe {str(source)!r} is neither a file nor a shipped recipe; shipped: {', '.join(list_recipes())}"
    )


def parse_overrides(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``["optimizer.lr=0.1", "rule=[auglocal,bp]"]`` -> ``{"optimizer.lr": 0.1, "rule": [...]}`` (YAML values)."""
    out: Dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not re.match(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$", key):
            raise RecipeError(f"override {item!r} must look like key=value or section.key=value (e.g. optimizer.lr=0.1)")
        try:
            out[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            out[key] = text  # a plain string such as a path with a colon
    return out


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of ``data`` with dotted-key ``overrides`` set (sections created as needed)."""
    import copy

    out = copy.deepcopy(dict(data))
    for key, value in overrides.items():
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"cannot set {key!r}: recipe field {'.'.join(parts[:i + 1])!r} is not a section",
                                  field=".".join(parts[:i + 1]))
            node = child
        node[parts[-1]] = value
    return out


def load_recipe(
    source: Union[str, Path, Mapping[str, Any], Recipe],
    *,
    overrides: Optional[Union[Sequence[str], Mapping[str, Any]]] = None,
) -> Recipe:
    """Load and validate a recipe.

    Args:
        source: a YAML file, the name of a shipped recipe (``"quickstart"``), a mapping, or a Recipe.
        overrides: ``["key=value", ...]`` strings or a ``{"dotted.key": value}`` mapping applied before validation.

    Raises:
        RecipeError: naming the field that is wrong and what it accepts.
    """
    name: Optional[str] = None
    if isinstance(source, Recipe):
        data = source.to_dict()
    elif isinstance(source, Mapping):
        data = dict(source)
    elif not isinstance(source, (str, Path)):
        raise RecipeError(f"a recipe must be a mapping of fields, a YAML file or a shipped recipe's name; "
                          f"got {type(source).__name__}")
    else:
        text, name = _resolve(source)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            first = str(e).splitlines()
            raise RecipeError(f"recipe {str(source)!r} is not valid YAML: {' '.join(s.strip() for s in first)}") \
                from None
        if data is None:
            raise RecipeError(f"recipe {str(source)!r} is empty")
    if overrides:
        pairs = parse_overrides(overrides) if not isinstance(overrides, Mapping) else dict(overrides)
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe must be a mapping of fields, got {show_value(data)}")
        data = apply_overrides(data, pairs)
    recipe = Recipe.from_dict(data)
    if recipe.name is None and name is not None:
        recipe.name = name
    return recipe
