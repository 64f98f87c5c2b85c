"""Model names -> models: torchvision / timm / auglocal registry / package.module:factory, and local weights."""
import sys
import textwrap
import uuid
import warnings

import pytest
import safetensors.torch
import torch
import torch.nn as nn

from auglocal_fx.hub import SOURCE_ATTR, create_model, list_model_names, load_pretrained_file, resolve_model_name


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet50", ("torchvision", "resnet50")),  # in both libraries: torchvision wins for plain names
        ("tv:resnet50", ("torchvision", "resnet50")),
        ("torchvision:resnet18", ("torchvision", "resnet18")),
        ("timm:resnet50", ("timm", "resnet50")),
        ("test_resnet", ("timm", "test_resnet")),
        ("resnet50.a1_in1k", ("timm", "resnet50.a1_in1k")),  # a timm pretrained tag
        ("resnet32", ("auglocal", "resnet32")),
        ("auglocal:resnet8", ("auglocal", "resnet8")),
    ],
)
def test_resolve_model_name(name, expected):
    assert resolve_model_name(name) == expected


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="unknown model 'resnet5O'") as info:
        resolve_model_name("resnet5O")
    assert "did you mean" in str(info.value) and "resnet50" in str(info.value)


def test_unknown_prefixed_name_suggests_within_the_library():
    with pytest.raises(ValueError, match="unknown timm model") as info:
        resolve_model_name("timm:test_resnett")
    assert "timm:test_resnet" in str(info.value)
    with pytest.raises(ValueError, match="unknown auglocal model"):
        resolve_model_name("auglocal:resnet50")  # torchvision has it, our registry does not
    with pytest.raises(ValueError, match="no model name"):
        resolve_model_name("timm:")


@pytest.mark.parametrize("bad", ["", "   ", None])
def test_empty_name(bad):
    with pytest.raises(ValueError, match="non-empty"):
        resolve_model_name(bad)


def test_list_model_names():
    names = list_model_names()
    assert {"resnet50", "resnet32", "test_resnet"} <= set(names)
    assert "resnet32" in list_model_names("auglocal") and "resnet32" not in list_model_names("tv")
    with pytest.raises(ValueError, match="unknown model library"):
        list_model_names("keras")


def test_create_model_records_its_source():
    model = create_model("resnet18", num_classes=10)
    assert type(model).__module__.startswith("torchvision") and model.fc.out_features == 10
    assert getattr(model, SOURCE_ATTR) == {"name": "tv:resnet18", "kwargs": {"num_classes": 10}}
    model = create_model("timm:test_resnet", num_classes=3, drop_rate=0.1)
    assert getattr(model, SOURCE_ATTR) == {"name": "timm:test_resnet", "kwargs": {"num_classes": 3, "drop_rate": 0.1}}
    model = create_model("resnet8")
    assert getattr(model, SOURCE_ATTR) == {"name": "auglocal:resnet8", "kwargs": {}}


def test_create_model_leaves_source_unset_for_kwargs_json_cannot_hold():
    model = create_model("resnet18", num_classes=4, norm_layer=nn.BatchNorm2d)
    assert not hasattr(model, SOURCE_ATTR)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """An importable module with a user's model factory, under a fresh name."""
    name = f"user_nets_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(
        """
        import torch.nn as nn

        def build(num_classes=10, width=8):
            return nn.Sequential(
                nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
            )

        class Factory:
            @staticmethod
            def small(num_classes=10):
                return build(num_classes, width=4)

        not_callable = 3
        """
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_python_factory(user_module):
    name = f"{user_module}:build"
    assert resolve_model_name(name) == ("python", name)
    model = create_model(name, num_classes=3, width=6)
    assert model[-1].out_features == 3 and model[0].out_channels == 6
    assert getattr(model, SOURCE_ATTR) == {"name": name, "kwargs": {"num_classes": 3, "width": 6}}
    assert create_model(f"{user_module}:Factory.small")[0].out_channels == 4


@pytest.mark.parametrize(
    "suffix, message",
    [(":nothing", "has no attribute"), (":not_callable", "not callable")],
)
def test_python_factory_errors(user_module, suffix, message):
    with pytest.raises(ValueError, match=message):
        create_model(user_module + suffix)


def test_python_path_errors():
    with pytest.raises(ValueError, match="cannot be imported"):
        resolve_model_name("no_such_package_xyz.nets:build")
    with pytest.raises(ValueError, match="package.module:factory"):
        resolve_model_name("my-nets:build")


def test_factory_must_return_a_module(user_module):
    with pytest.raises(TypeError, match="not an nn.Module"):
        create_model("builtins:dict")


def test_pretrained_true_keeps_the_library_code_path(monkeypatch, tmp_path):
    # No network in tests: check that timm is asked for its own pretrained weights, not that they download. The
    # weights are "in the hub's cache" (a file where the hub keeps them), so nothing needs the network.
    import timm
    from huggingface_hub import constants

    snapshot = tmp_path / "models--timm--resnet50.a1_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"")
    (tmp_path / "models--timm--resnet50.a1_in1k" / "refs").mkdir()
    (tmp_path / "models--timm--resnet50.a1_in1k" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))

    calls = []

    def fake_create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, kwargs))
        return nn.Linear(2, 2)

    monkeypatch.setattr(timm, "create_model", fake_create_model)
    model = create_model("timm:resnet50", pretrained=True, num_classes=5)
    assert calls == [("resnet50", True, {"num_classes": 5})]
    # The weights live in the artifact: a rebuild must not download them again.
    assert getattr(model, SOURCE_ATTR) == {"name": "timm:resnet50", "kwargs": {"num_classes": 5}}


def test_pretrained_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        create_model("resnet18", pretrained=True, pretrained_file=tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="no downloadable weights"):
        create_model("auglocal:resnet8", pretrained=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_model("resnet8", pretrained_file=tmp_path / "missing.safetensors")


def _equal_state(a: nn.Module, b: nn.Module, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa if k not in skip)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_file(tmp_path, suffix):
    source = create_model("resnet8", num_classes=10)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(source.state_dict(), str(path))
    else:
        # A training checkpoint from DDP: wrapped and prefixed; still plain tensors, so weights_only reads it.
        torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    model = create_model("resnet8", num_classes=10, pretrained_file=path)
    assert _equal_state(model, source)


def test_pretrained_file_is_never_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": create_model("resnet8").state_dict(), "extra": _Payload()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        create_model("resnet8", pretrained_file=path)


class _Payload:
    """Stands for an arbitrary pickled object: torch.load(weights_only=True) must refuse it."""


def test_pretrained_file_with_another_classifier(tmp_path):
    source = create_model("resnet8", num_classes=100)
    path = tmp_path / "c100.safetensors"
    safetensors.torch.save_file(source.state_dict(), str(path))
    target = create_model("resnet8", num_classes=10)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.warns(UserWarning, match="classifier"):
        load_pretrained_file(target, path, num_classes=10)
    after = target.state_dict()
    head = [k for k, v in before.items() if source.state_dict()[k].shape != v.shape]
    assert len(head) == 2  # the classifier's weight and bias keep their own initialisation
    assert all(torch.equal(after[k], before[k]) for k in head)
    assert all(torch.equal(after[k], source.state_dict()[k]) for k in before if k not in head)
    # Without num_classes the mismatch is an error, not a silent reset.
    with pytest.raises(ValueError, match="shape mismatches"):
        load_pretrained_file(create_model("resnet8", num_classes=10), path)


def test_pretrained_file_of_another_architecture(tmp_path):
    path = tmp_path / "r20.safetensors"
    safetensors.torch.save_file(create_model("resnet20").state_dict(), str(path))
    with pytest.raises(ValueError, match="unexpected keys") as info:
        create_model("resnet8", pretrained_file=path)
    assert str(path) in str(info.value)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        create_model("resnet8", pretrained_file=bad)


def test_caller_kwargs_not_mutated():
    kwargs = {"num_classes": 7}
    create_model("resnet8", **kwargs)
    assert kwargs == {"num_classes": 7}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_model("resnet8")  # no warning on the ordinary path
