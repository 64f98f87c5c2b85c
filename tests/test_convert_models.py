"""Across architectures: eval-mode LocalModel.forward equals the original model, and one local_step gives
every backbone and aux parameter a gradient. Small inputs keep it fast; heavy models are marked slow."""
import pytest
import timm
import torch
import torchvision

import auglocal_fx

from _models import FunctionalNet, GatedNet

tv = torchvision.models

# name -> (factory, input size); every model built with random weights and 10 classes.
ARCHITECTURES = {
    "tv_resnet18": (lambda: tv.resnet18(num_classes=10), (3, 32, 32)),
    "tv_resnet50": (lambda: tv.resnet50(num_classes=10), (3, 64, 64)),
    "tv_mobilenet_v3_large": (lambda: tv.mobilenet_v3_large(num_classes=10), (3, 64, 64)),
    "tv_efficientnet_b0": (lambda: tv.efficientnet_b0(num_classes=10), (3, 64, 64)),
    "tv_convnext_tiny": (lambda: tv.convnext_tiny(num_classes=10), (3, 64, 64)),
    "tv_regnet_y_400mf": (lambda: tv.regnet_y_400mf(num_classes=10), (3, 64, 64)),
    "tv_densenet121": (lambda: tv.densenet121(num_classes=10), (3, 64, 64)),
    "tv_inception_v3": (lambda: tv.inception_v3(num_classes=10, init_weights=False), (3, 80, 80)),
    "tv_vit_b_16": (lambda: tv.vit_b_16(num_classes=10, image_size=64), (3, 64, 64)),
    "tv_swin_t": (lambda: tv.swin_t(num_classes=10), (3, 64, 64)),
    "tv_shufflenet_v2_x1_0": (lambda: tv.shufflenet_v2_x1_0(num_classes=10), (3, 64, 64)),
    "tv_squeezenet1_1": (lambda: tv.squeezenet1_1(num_classes=10), (3, 64, 64)),
    "tv_googlenet": (lambda: tv.googlenet(num_classes=10, init_weights=False), (3, 64, 64)),
    "tv_mnasnet0_5": (lambda: tv.mnasnet0_5(num_classes=10), (3, 64, 64)),
    "timm_vit_tiny": (lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=64), (3, 64, 64)),
    "timm_deit_tiny_distilled": (
        lambda: timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, img_size=64), (3, 64, 64)),
    "timm_swin_tiny": (
        lambda: timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, img_size=64, window_size=4), (3, 64, 64)),
    "timm_convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=10), (3, 64, 64)),
    "timm_efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=10), (3, 64, 64)),
    "timm_regnetx_002": (lambda: timm.create_model("regnetx_002", num_classes=10), (3, 64, 64)),
    "timm_dla34": (lambda: timm.create_model("dla34", num_classes=10), (3, 64, 64)),
    "timm_hrnet_w18_small": (lambda: timm.create_model("hrnet_w18_small", num_classes=10), (3, 64, 64)),
    "hand_functional": (lambda: FunctionalNet(), (3, 16, 16)),
    "hand_untraceable_block": (lambda: GatedNet(), (3, 16, 16)),
}
for _name in timm.list_models("test_*"):
    ARCHITECTURES[f"timm_{_name}"] = ((lambda n=_name: timm.create_model(n, num_classes=10)), None)

SLOW = {"tv_vit_b_16", "tv_inception_v3", "tv_swin_t", "tv_convnext_tiny", "tv_densenet121", "timm_dla34",
        "timm_hrnet_w18_small", "timm_swin_tiny"}
SLOW_EXTRA = {"tv_vgg16_bn": (lambda: tv.vgg16_bn(num_classes=10), (3, 32, 32))}


def _check(factory, size, layers=None):
    torch.manual_seed(0)
    model = factory()
    size = size or model.pretrained_cfg["input_size"]
    info = auglocal_fx.inspect_model(model, input_size=size)
    lm = auglocal_fx.convert(model, layers=layers or len(info.units), input_size=size)
    x = torch.randn(2, *size)
    model.eval(), lm.eval()
    with torch.no_grad():
        reference, output = model(x), lm(x)
    assert output.shape == reference.shape
    assert torch.allclose(output, reference, rtol=0, atol=1e-6), (output - reference).abs().max()
    lm.train()
    lm.local_step(torch.randn(4, *size), torch.randint(0, 10, (4,)))
    missing = [n for n, p in lm.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    return lm


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in ARCHITECTURES]
)
def test_equivalence_and_gradients(name):
    factory, size = ARCHITECTURES[name]
    _check(factory, size)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_EXTRA))
def test_equivalence_heavy_heads(name):
    factory, size = SLOW_EXTRA[name]
    _check(factory, size, layers=4)


def test_at_least_thirty_architectures():
    assert len(ARCHITECTURES) + len(SLOW_EXTRA) >= 30
