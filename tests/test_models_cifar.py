"""The paper's CIFAR ResNets: registered by name, the right shapes, and the unit structure AugLocal relies on."""
import inspect

import pytest
import torch

import auglocal_fx
from auglocal_fx.models import create_registered_model, is_model, list_models
from auglocal_fx.models.cifar_resnet import CifarResNet


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"])
def test_registered_with_keyword_only_signature(name):
    assert is_model(name) and name in list_models("resnet*")
    factory = auglocal_fx.models.get_model_factory(name)
    params = inspect.signature(factory).parameters
    assert params["num_classes"].kind is inspect.Parameter.KEYWORD_ONLY and params["num_classes"].default == 10
    assert params["in_chans"].kind is inspect.Parameter.KEYWORD_ONLY and params["in_chans"].default == 3
    with pytest.raises(TypeError):
        factory(10)  # positional arguments are refused


def test_forward_shapes_and_options():
    model = create_registered_model("resnet20", num_classes=100, in_chans=1).eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 100)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 100)  # any size: global average pooling
    narrow = create_registered_model("resnet8", width=4)
    assert narrow.layer3[0].conv1.out_channels == 16 and narrow.fc.in_features == 16
    assert model.pretrained_cfg["input_size"] == (1, 32, 32)


def test_structure_of_resnet32():
    model = create_registered_model("resnet32")
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [5, 5, 5]
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels,
            model.layer3[0].conv1.out_channels] == [16, 32, 64]
    assert model.layer2[0].conv1.stride == (2, 2) and model.layer2[0].downsample is not None
    assert model.layer1[0].downsample is None
    params = sum(p.numel() for p in model.parameters())
    assert 450_000 < params < 480_000, params  # ~0.46M, as in He et al. (projection shortcuts add ~12K)
    assert model._auglocal_source == {"name": "auglocal:resnet32", "kwargs": {"num_classes": 10, "in_chans": 3}}


@pytest.mark.parametrize("depth", [7, 9, 33, 2])
def test_invalid_depth(depth):
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(depth=depth)


@pytest.mark.parametrize("name,units", [("resnet8", 4), ("resnet32", 16), ("resnet110", 55)])
def test_units_seen_by_auglocal(name, units):
    inspection = auglocal_fx.inspect_model(create_registered_model(name))
    assert len(inspection.units) == units


def test_paper_plan_for_resnet32():
    # K=16, d=2, tau=0.5: every aux depth is 2; unit 0's aux net copies units 8 and 15 (REFERENCE.md).
    lm = auglocal_fx.convert(create_registered_model("resnet32"), layers=16, aux_depth=2, pyramid=0.5)
    assert len(lm.layers) == 16 and len(lm.aux) == 15
    assert [a.depth for a in lm.plan.aux] == [2] * 15
    assert list(lm.plan.aux[0].units) == [8, 15] and list(lm.plan.aux[3].units) == [9, 15]
    assert list(lm.plan.aux[14].units) == [15]
    x = torch.randn(2, 3, 32, 32)
    lm.eval()
    torch.testing.assert_close(lm(x), lm.source_model.eval()(x))
