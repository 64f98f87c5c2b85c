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
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

__all__ = [
    "RecipeError", "Recipe", "ModelSpec", "ConvertSpec", "DataSpec", "OptimizerSpec", "ScheduleSpec",
    "load_recipe", "parse_overrides", "apply_overrides", "list_recipes", "RULES",
]

RULES = ("auglocal", "bp")
_AMP = ("none", "bf16", "fp16")
_SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly", "constant", "none")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class RecipeError(ValueError):
    """A recipe that cannot be used; ``field`` is the dotted name of the offending field (or None)."""

    def __init__(self, message: str, *, field: Optional[str] = None) -> None:
        super().__init__(message)
        self.field = field


def _spec(default: Any = dataclasses.MISSING, *, help: str, factory: Any = None, **checks: Any) -> Any:
    """A dataclass field carrying its help text and checks (choices, min, gt, max, nonempty)."""
    meta = {"help": help, **checks}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSpec:
    name: str = _spec(help="model name as auglocal_fx.create_model reads it: resnet32 (auglocal_fx's own), "
                           "timm:NAME, tv:NAME (torchvision), or package.module:factory")
    pretrained_file: Optional[str] = _spec(
        None, help="local weights file (.pth/.safetensors) to start from; nothing is downloaded")
    num_classes: Optional[int] = _spec(None, help="classifier size; default: the data set's", min=1)
    in_chans: Optional[int] = _spec(None, help="input channels; default: the data set's", min=1)
    kwargs: Dict[str, Any] = _spec(help="extra keyword arguments for the model constructor", factory=dict)


@dataclass
class ConvertSpec:
    layers: int = _spec(4, help="number of local layers K (the paper: one per unit)", min=1)
    aux_depth: int = _spec(2, help="base depth d of the aux nets (units copied from the layers above)", min=1)
    pyramid: float = _spec(0.5, help="pyramidal depth coefficient tau (0 = same depth for all)", min=0.0, max=1.0)
    aux_init: str = _spec("copy", help="aux net initialisation", choices=("copy", "fresh"))
    input_size: Optional[List[int]] = _spec(
        None, help="(C, H, W) for tracing; default: from the data (channels, img_size, img_size)", length=3)
    cuts: Optional[List[str]] = _spec(None, help="explicit cut node names (overrides the even split)")
    leaf_modules: Optional[List[str]] = _spec(None, help="module class names to keep opaque when tracing")


@dataclass
class DataSpec:
    name: str = _spec(help="data set", choices=(
        "digits", "fashion_mnist", "cifar10", "cifar100", "svhn", "stl10", "imagenet", "imagefolder"))
    root: Optional[str] = _spec(None, help="data folder (default: $AUGLOCAL_DATA or ~/.cache/auglocal_fx/data)")
    download: bool = _spec(False, help="download a torchvision data set into root when missing")
    img_size: Optional[int] = _spec(None, help="training/eval resolution; default: the data set's own", min=1)
    augment: str = _spec("auto", help="training augmentation",
                         choices=("auto", "none", "flip", "crop", "crop_flip", "rrc"))
    auto_augment: Optional[str] = _spec(None, help="timm auto-augment policy, e.g. rand-m9-mstd0.5 (augment: rrc)")
    re_prob: float = _spec(0.0, help="random erasing probability", min=0.0, max=1.0)
    mean: Optional[List[float]] = _spec(None, help="normalisation mean; default: the data set's")
    std: Optional[List[float]] = _spec(None, help="normalisation std; default: the data set's")
    interpolation: str = _spec("bilinear", help="resize interpolation", choices=("bilinear", "bicubic", "nearest"))
    crop_pct: Optional[float] = _spec(None, help="eval centre-crop fraction; default: the data set's", gt=0.0, max=1.0)
    train_subset: Optional[int] = _spec(None, help="train on a fixed random subset of this size", min=1)
    eval_subset: Optional[int] = _spec(None, help="evaluate on a fixed random subset of this size", min=1)
    num_workers: int = _spec(0, help="DataLoader worker processes", min=0)
    pin_memory: Optional[bool] = _spec(None, help="pin host memory; default: when training on CUDA")
    train_dir: str = _spec("train", help="training sub-folder of root (imagenet/imagefolder)")
    eval_dir: str = _spec("val", help="evaluation sub-folder of root (imagenet/imagefolder)")


@dataclass
class OptimizerSpec:
    name: str = _spec("sgd", help="timm optimizer name (sgd = SGD with Nesterov momentum, momentum = without, adamw, ...)")
    lr: float = _spec(0.1, help="base learning rate", gt=0.0)
    momentum: float = _spec(0.9, help="momentum (SGD-like optimizers)", min=0.0, max=1.0)
    weight_decay: float = _spec(1e-4, help="weight decay", min=0.0)
    filter_bias_and_bn: bool = _spec(True, help="no weight decay on biases and norm weights (timm's default)")
    betas: Optional[List[float]] = _spec(None, help="Adam-style betas", length=2)
    eps: Optional[float] = _spec(None, help="Adam-style epsilon", gt=0.0)


@dataclass
class ScheduleSpec:
    name: str = _spec("cosine", help="timm learning-rate schedule, stepped once per epoch", choices=_SCHEDULES)
    warmup_epochs: int = _spec(0, help="linear warm-up epochs", min=0)
    warmup_lr: float = _spec(1e-5, help="learning rate at the start of warm-up", min=0.0)
    min_lr: float = _spec(0.0, help="floor of the decay", min=0.0)
    decay_epochs: Optional[float] = _spec(None, help="step: epochs between decays", gt=0.0)
    decay_milestones: Optional[List[int]] = _spec(None, help="multistep: epochs at which to decay")
    decay_rate: float = _spec(0.1, help="step/multistep: decay factor", gt=0.0)


@dataclass
class Recipe:
    model: ModelSpec = _spec(help="the model to train")
    data: DataSpec = _spec(help="the data set")
    convert: ConvertSpec = _spec(help="how auglocal_fx.convert splits the model", factory=ConvertSpec)
    optimizer: OptimizerSpec = _spec(help="one optimizer over backbone and aux nets", factory=OptimizerSpec)
    schedule: ScheduleSpec = _spec(help="learning-rate schedule", factory=ScheduleSpec)
    rule: Union[str, List[str]] = _spec("auglocal", help="auglocal, bp (end-to-end baseline), or a list to run both")
    name: Optional[str] = _spec(None, help="run name (default: the recipe file's name)")
    description: Optional[str] = _spec(None, help="free text")
    epochs: int = _spec(10, help="training epochs", min=1)
    batch_size: int = _spec(128, help="training batch size", min=1)
    eval_batch_size: Optional[int] = _spec(None, help="evaluation batch size; default: batch_size", min=1)
    amp: str = _spec("none", help="automatic mixed precision", choices=_AMP)
    channels_last: bool = _spec(False, help="NHWC memory format (faster convs on recent GPUs)")
    compile: bool = _spec(False, help="torch.compile each local layer and aux net")
    seed: int = _spec(0, help="random seed (model init, data order, augmentation)", min=0)
    deterministic: bool = _spec(False, help="deterministic kernels (bit-identical resume on CPU)")
    device: str = _spec("auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps")
    num_threads: Optional[int] = _spec(
        None, help="CPU threads for torch ops (torch.set_num_threads); default: torch's choice", min=1)
    label_smoothing: float = _spec(0.0, help="cross-entropy label smoothing (all losses)", min=0.0, max=1.0)
    grad_clip: Optional[float] = _spec(None, help="clip the global gradient norm to this value", gt=0.0)
    eval_every: int = _spec(1, help="evaluate every N epochs (and always after the last)", min=1)
    limit_train_batches: Optional[int] = _spec(None, help="stop each epoch after N batches (smoke runs)", min=1)
    limit_eval_batches: Optional[int] = _spec(None, help="evaluate on the first N batches only", min=1)
    output_dir: Optional[str] = _spec(None, help="where runs are written (default: runs/<name>)")

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
        recipe = _build(cls, data, prefix="")
        _check_recipe(recipe)
        return recipe


# --------------------------------------------------------------------------------------------------
# Generic validation driven by the dataclass type hints and field metadata.

def _where(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _build(cls: type, data: Any, *, prefix: str) -> Any:
    label = f"recipe field {prefix!r}" if prefix else "a recipe"
    if not isinstance(data, Mapping):
        raise RecipeError(f"{label} must be a mapping of fields, got {_show(data)}", field=prefix or None)
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
        return _build(tp, value, prefix=where)
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
        raise RecipeError(f"recipe field {where!r} must be {_describe(tp, meta)}, got {_show(value)}", field=where)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"recipe field {where!r} must be {_describe(tp, meta)}, got {_show(value)}", field=where)
        if "length" in meta and len(value) != meta["length"]:
            raise RecipeError(
                f"recipe field {where!r} must be a list of {meta['length']} values, got {_show(value)}", field=where)
        (item_tp,) = args
        return [_coerce(v, item_tp, f"{where}[{i}]", {}) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise RecipeError(f"recipe field {where!r} must be a mapping with string keys, got {_show(value)}",
                              field=where)
        return dict(value)
    if tp is Any:
        return value
    return _check_scalar(_scalar(value, tp, where, meta), where, meta, shown=_show(value))


def _scalar(value: Any, tp: type, where: str, meta: Mapping[str, Any]) -> Any:
    bad = RecipeError(f"recipe field {where!r} must be {_describe(tp, meta)}, got {_show(value)}", field=where)
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


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    if text.endswith("\n...") or text.endswith(" ..."):
        text = text[:-4].strip()
    return text if len(text) <= 60 else text[:57] + "..."


def _check_recipe(r: Recipe) -> None:
    """Checks that involve more than one field, or knowledge outside the schema."""
    rules = r.rules
    if not rules:
        raise RecipeError("recipe field 'rule' must name at least one of auglocal, bp", field="rule")
    for i, rule in enumerate(rules):
        if rule not in RULES:
            where = "rule" if isinstance(r.rule, str) else f"rule[{i}]"
            raise RecipeError(f"recipe field {where!r} must be one of {', '.join(RULES)}; got {rule!r}", field=where)
    if len(set(rules)) != len(rules):
        raise RecipeError(f"recipe field 'rule' lists a rule twice: {rules}", field="rule")
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
    if r.amp == "fp16" and r.device == "cpu":
        raise RecipeError("recipe field 'amp' fp16 needs a GPU; use bf16 on CPU (or device: auto/cuda)", field="amp")


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
            raise RecipeError(f"a recipe must be a mapping of fields, got {_show(data)}")
        data = apply_overrides(data, pairs)
    recipe = Recipe.from_dict(data)
    if recipe.name is None and name is not None:
        recipe.name = name
    return recipe
