"""The baseline local-learning rules (DGL, PredSim, InfoPro, greedy SL): aux nets built from the real shapes of
any model (maps, tokens, NHWC, vectors), exact reference structure, local training semantics, save/load, errors."""
import json
import math
import pathlib
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import auglocal_fx
from auglocal_fx import ConversionError
from auglocal_fx.plan import AuxSpec, HeadSpec, LayerSpec, UnitSpec
from auglocal_fx.rules import LossContext, PlanContext, get_rule, list_rules, loss_weights
from auglocal_fx.rules._base import _RULES
from auglocal_fx.rules._maps import feature_map, token_grid
from auglocal_fx.rules.predsim import pool_kernel, similarity_matrix

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RULES = ["dgl", "predsim", "infopro", "greedy"]
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


# -- models ----------------------------------------------------------------------------------------------------
class _MLPBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class NHWCNet(nn.Module):
    """Swin-like: (B, H, W, C) between blocks, a 2x2 patch merging between the two stages."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.embed = nn.Conv2d(3, 12, 4, stride=4)
        self.block1 = _MLPBlock(12)
        self.merge = nn.Linear(4 * 12, 24)
        self.block2 = _MLPBlock(24)
        self.head = nn.Linear(24, num_classes)

    def forward(self, x):
        x = self.block1(self.embed(x).permute(0, 2, 3, 1))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        x = self.block2(self.merge(x))
        return self.head(x.mean((1, 2)))


def cifar_cnn(num_classes=10):
    """ResNet-32's stage widths and resolutions: 16 @ 32x32, 32 @ 16x16, 64 @ 8x8."""

    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(block(3, 16, 1), block(16, 32, 2), block(32, 64, 2), block(64, 64, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


def vec_net(num_classes=10):
    """An MLP on images: every hidden layer's output is a vector."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 24), nn.ReLU(), nn.Linear(24, 20), nn.ReLU(),
                         nn.Linear(20, num_classes))


# name -> (factory, input size, K, saveable); the saveable ones are built by create_model and carry a source.
MODELS = {
    "resnet18": (lambda: auglocal_fx.create_model("resnet18", num_classes=10), (3, 32, 32), 4, True),
    "vit": (lambda: auglocal_fx.create_model("timm:test_vit", num_classes=10, img_size=64), (3, 64, 64), 3, True),
    "cnn": (lambda: auglocal_fx.create_model("_models:tiny_net", num_classes=10), (3, 32, 32), 4, True),
    "nhwc": (lambda: NHWCNet(), (3, 32, 32), 3, False),
}


@pytest.fixture(scope="module", params=[(r, m) for r in RULES for m in MODELS], ids=lambda p: f"{p[0]}-{p[1]}")
def converted(request):
    rule, name = request.param
    factory, size, layers, saveable = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    lm = auglocal_fx.convert(model, layers=layers, input_size=size, rule=rule)
    return lm, model, size, saveable


def _batch(size, n=4, classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *size, generator=g), torch.randint(0, classes, (n,), generator=g)


# -- the converted models --------------------------------------------------------------------------------------
def test_eval_forward_equals_the_original(converted):
    lm, model, size, _ = converted
    x, _ = _batch(size)
    lm.eval(), model.eval()
    try:
        with torch.no_grad():
            assert torch.equal(lm(x), model(x))
            logits = lm.layerwise_logits(x)
        assert all(t.shape == (4, 10) for t in logits)
    finally:
        lm.train(), model.train()


def test_every_parameter_learns_in_one_local_step(converted):
    lm, _, size, _ = converted
    x, y = _batch(size)
    lm.zero_grad(set_to_none=True)
    losses = lm.local_step(x, y, mean=MEAN, std=STD)
    assert len(losses) == len(lm.layers) and all(torch.isfinite(v) for v in losses)
    missing = [n for n, p in lm.named_parameters() if p.grad is None]
    assert not missing, missing[:5]


def test_no_gradient_crosses_a_layer_boundary(converted):
    lm, _, size, _ = converted
    x, y = _batch(size)
    inputs = x
    for k in range(len(lm.layers)):
        lm.zero_grad(set_to_none=True)
        x_in = x.detach().requires_grad_(True)
        out, _ = lm.train_layer(k, x_in, y, inputs=inputs, mean=MEAN, std=STD)
        own = set(map(id, lm.local_parameters(k)))
        with_grad = {id(p) for p in lm.parameters() if p.grad is not None}
        assert with_grad == own, f"layer {k}: gradients outside its own parameters, or some of them missing"
        assert not out.requires_grad  # what layer k+1 receives is cut from layer k's graph
        x = out


def test_round_trip_through_save_and_load(converted, tmp_path):
    lm, _, size, saveable = converted
    if not saveable:
        pytest.skip("built without create_model: no source to rebuild it from")
    auglocal_fx.save(lm, tmp_path / "a")
    loaded = auglocal_fx.load(tmp_path / "a")
    assert loaded.plan.to_dict() == lm.plan.to_dict() and loaded.rule.name == lm.rule.name
    a, b = lm.aux.state_dict(), loaded.aux.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, _ = _batch(size)
    lm.eval(), loaded.eval()
    try:
        for u, v in zip(lm.layerwise_logits(x), loaded.layerwise_logits(x)):
            assert torch.equal(u, v)
    finally:
        lm.train()


def test_summary_shows_aux_params_and_flops(converted):
    lm, _, _, _ = converted
    for spec, aux in zip(lm.plan.aux, lm.aux):
        assert spec.params == sum(p.numel() for p in aux.parameters()) > 0
        assert spec.flops > 0 and spec.net["summary"]
        assert json.loads(json.dumps(spec.net)) == spec.net  # plain JSON data: lists, numbers, strings
        rebuilt = lm.rule.build_aux(AuxSpec(**json.loads(json.dumps(spec.__dict__))), None)  # from the spec alone
        assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in aux.parameters()]
    assert lm.plan.aux[0].net["summary"] in lm.summary()


# -- layouts -----------------------------------------------------------------------------------------------------
def test_feature_maps_of_each_layout():
    assert feature_map([16, 32, 32], 1.0)["map"] == [16, 32, 32]
    hwc = feature_map([8, 8, 12], 1.0)
    assert (hwc["layout"], hwc["map"]) == ("hwc", [12, 8, 8])
    vit = feature_map([17, 64], 1.0)  # class token + 4x4 grid
    assert (vit["layout"], vit["map"], vit["prefix"]) == ("tokens", [64, 4, 4], 1)
    assert feature_map([16, 64], 1.0)["map"] == [64, 4, 4] and feature_map([16, 64], 1.0)["prefix"] == 0
    assert feature_map([129, 32], 0.5)["map"] == [32, 8, 16]  # a 128x256 input, patches of 16
    assert token_grid(261, 1.0) == (5, 16, 16)  # class + 4 register tokens
    assert token_grid(13, 1.0) == (0, 1, 13)  # no grid: a 1 x N map
    assert feature_map([20], 1.0)["map"] == [20, 1, 1]
    with pytest.raises(ConversionError, match="cannot be read as a feature map"):
        feature_map([2, 3, 4, 5], 1.0)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("model", ["vit_no_class_token", "vec"])
def test_other_layouts_train(rule, model):
    if model == "vec":
        m, size, layers = vec_net(), (3, 8, 8), 3
    else:
        import timm
        m, size, layers = timm.create_model("test_vit", num_classes=10, img_size=32, class_token=False,
                                            global_pool="avg"), (3, 32, 32), 2
    lm = auglocal_fx.convert(m, layers=layers, input_size=size, rule=rule)
    expected = {"vec": "vec", "vit_no_class_token": "tokens"}[model]
    assert lm.plan.aux[0].net["layout"] == expected
    x, y = _batch(size)
    lm.zero_grad(set_to_none=True)
    lm.local_step(x, y, mean=MEAN, std=STD)
    assert all(p.grad is not None for p in lm.parameters())


def test_class_token_reaches_the_aux_net():
    """The prefix tokens' mean is added to every patch position: the first layer's loss trains the class token."""
    m = auglocal_fx.create_model("timm:test_vit", num_classes=10, img_size=32)
    # Layer 0 is the stem alone: its class token is cls_token + pos_embed[0], seen by no patch token yet.
    lm = auglocal_fx.convert(m, layers=2, input_size=(3, 32, 32), rule="greedy", cuts=["norm_pre"])
    assert lm.plan.aux[0].net["prefix"] == 1 and lm.plan.aux[0].net["map"] == [64, 2, 2]
    x, y = _batch((3, 32, 32))
    lm.train_layer(0, x, y)
    assert lm.layers[0].get_parameter("cls_token").grad.abs().sum() > 0


# -- the reference's structure, exact parameter counts -------------------------------------------------------------
def _conv(cin, cout, k, bias=False):
    return cin * cout * k * k + (cout if bias else 0)


def _linear(cin, cout, bias=True):
    return cin * cout + (cout if bias else 0)


def _bn(c):
    return 2 * c


def _dgl(c, m, n):
    f = c * m * m
    return 3 * (_conv(c, c, 1) + _bn(c)) + 2 * (_linear(f, f, bias=False) + _bn(f)) + _linear(f, n)


def _infopro(c, width, n, in_ch=3):
    classifier = _conv(c, width, 3) + _bn(width) + _linear(width, 128) + _linear(128, n)
    decoder = _conv(c, 12, 3, bias=True) + _bn(12) + _conv(12, in_ch, 3, bias=True)
    return classifier + decoder


def _predsim(c, features, n):
    return _linear(features, n) + _conv(c, c, 3)


@pytest.fixture(scope="module")
def cifar_plans():
    torch.manual_seed(0)
    return {rule: auglocal_fx.convert(cifar_cnn(), layers=4, input_size=(3, 32, 32), rule=rule) for rule in RULES}


def test_exact_parameter_counts_at_resnet32_shapes(cifar_plans):
    # Layer outputs: 16 x 32 x 32, 32 x 16 x 16, 64 x 8 x 8 (ResNet-32's three stages), 10 classes.
    expected = {
        "dgl": [_dgl(16, 2, 10), _dgl(32, 2, 10), _dgl(64, 2, 10)],
        # The next stage's width with stride 2, then the last stage's own width.
        "infopro": [_infopro(16, 32, 10), _infopro(32, 64, 10), _infopro(64, 64, 10)],
        # Pooled to 512 features at each of the three shapes.
        "predsim": [_predsim(16, 512, 10), _predsim(32, 512, 10), _predsim(64, 512, 10)],
        "greedy": [_linear(16, 10), _linear(32, 10), _linear(64, 10)],
    }
    assert expected["dgl"] == [9962, 37834, 147338]  # the formulas, evaluated by hand
    assert expected["infopro"] == [12277, 31989, 53877]
    for rule, counts in expected.items():
        lm = cifar_plans[rule]
        assert [sum(p.numel() for p in aux.parameters()) for aux in lm.aux] == counts, rule
        assert [spec.params for spec in lm.plan.aux] == counts, rule
    strides = [(s.net["conv_width"], s.net["conv_stride"]) for s in cifar_plans["infopro"].plan.aux]
    assert strides == [(32, 2), (64, 2), (64, 1)]
    dgl0 = cifar_plans["dgl"].aux[0].head
    assert dgl0[0].output_size == (8, 8) and dgl0[10].output_size == (2, 2)
    assert [s.net["kernel"] for s in cifar_plans["predsim"].plan.aux] == [[8, 4], [4, 4], [4, 2]]


def _context(out_shape, later=(), input_size=(3, 32, 32), classes=10, rule="dgl", options=None):
    """A PlanContext for one hidden layer of per-sample output ``out_shape`` followed by units of ``later`` shapes."""
    shapes = [list(out_shape)] + [list(s) for s in later]
    units = [UnitSpec(i, f"u{i}", "a", "b", [], 0, 0, s, s) for i, s in enumerate(shapes)]
    head = HeadSpec("h", [], 0, 0, shapes[-1], [classes])
    layers = [LayerSpec(0, [0], "b", 0, 0, list(out_shape)), LayerSpec(1, list(range(1, len(shapes))), None, 0, 0,
                                                                       [classes])]
    impl = get_rule(rule)
    return impl, layers[0], PlanContext(units=units, head=head, layers=layers, input_size=tuple(input_size),
                                        config={}, options=impl.resolve_options(options))


@pytest.mark.parametrize("shape, m, pool", [([16, 32, 32], 2, 8), ([512, 1, 1], 1, 1), ([8, 5, 5], 2, 2),
                                            ([40, 7, 7], 2, 2), ([24, 4, 4], 1, 1)])
def test_dgl_pools_follow_the_real_size(shape, m, pool):
    rule, layer, ctx = _context(shape)
    spec = rule.plan_aux(layer, ctx)
    assert spec.net["pool"] == [pool, pool] and spec.net["mlp_pool"] == [m, m]
    aux = rule.build_aux(spec, None)  # from the spec alone
    assert sum(p.numel() for p in aux.parameters()) == spec.params == _dgl(shape[0], m, 10)
    aux.train()
    assert aux(torch.randn(3, *shape)).shape == (3, 10)


def test_dgl_on_a_non_square_map():
    rule, layer, ctx = _context([8, 12, 4], input_size=(3, 96, 32))
    spec = rule.plan_aux(layer, ctx)
    assert spec.net["pool"] == [3, 1] and spec.net["mlp_pool"] == [2, 1] and spec.net["features"] == 16


@pytest.mark.parametrize("c, h, w, target", [(16, 32, 32, 512), (64, 5, 5, 512), (3, 7, 9, 512), (1024, 1, 1, 512),
                                             (8, 13, 6, 64), (32, 16, 16, 4096)])
def test_predsim_pooling_fits_the_budget(c, h, w, target):
    kernel, padding, pooled = pool_kernel(c, h, w, target)
    out = nn.AvgPool2d(tuple(kernel), padding=tuple(padding))(torch.randn(1, c, h, w))
    assert list(out.shape[2:]) == pooled
    assert c * pooled[0] * pooled[1] <= target or (kernel[0] >= h and kernel[1] >= w)
    rule, layer, ctx = _context([c, h, w], rule="predsim", options={"dim_in_decoder": target})
    spec = rule.plan_aux(layer, ctx)
    assert spec.net["features"] == c * pooled[0] * pooled[1]
    assert spec.params == _predsim(c, spec.net["features"], 10)


def test_infopro_width_comes_from_the_later_shapes():
    # A Swin-like NHWC pyramid: the next stage (half the size, 2x the width) sets the conv.
    rule, layer, ctx = _context([16, 16, 40], later=[[16, 16, 40], [8, 8, 80], [4, 4, 160]], rule="infopro",
                                input_size=(1, 64, 64))
    spec = rule.plan_aux(layer, ctx)
    assert (spec.net["layout"], spec.net["conv_width"], spec.net["conv_stride"]) == ("hwc", 80, 2)
    assert spec.params == _infopro(40, 80, 10, in_ch=1)  # a grayscale input: the decoder outputs 1 channel
    # A ViT never downsamples: its own width, stride 1.
    rule, layer, ctx = _context([17, 64], later=[[17, 64]] * 3, rule="infopro")
    spec = rule.plan_aux(layer, ctx)
    assert (spec.net["conv_width"], spec.net["conv_stride"]) == (64, 1)


# -- the losses --------------------------------------------------------------------------------------------------
def test_loss_weights_match_the_reference_infopro_setting():
    x, y = (5, 0.2), (0.05, 0.5)
    assert loss_weights(0, 16, x, y) == (5.0, 0.05)
    assert loss_weights(14, 16, x, y) == pytest.approx((0.2, 0.5))
    assert loss_weights(7, 16, x, y) == pytest.approx((5 * 0.5 + 0.2 * 0.5, 0.05 * 0.5 + 0.5 * 0.5))  # r = 1/2
    assert loss_weights(3, 2, x, y) == (5.0, 0.05)  # K <= 2: r = 0
    infopro = get_rule("infopro")
    ctx = LossContext(layer=14, num_layers=16, options=infopro.resolve_options(None))
    assert infopro.weights(ctx) == pytest.approx((0.2, 0.5))
    predsim = get_rule("predsim")
    for layer in (0, 9, 14):
        ctx = LossContext(layer=layer, num_layers=16, options=predsim.resolve_options(None))
        assert predsim.weights(ctx) == pytest.approx((0.99, 0.01))


def test_infopro_loss_is_the_weighted_sum(cifar_plans):
    lm = cifar_plans["infopro"]
    x, y = _batch((3, 32, 32), n=6)
    h = lm.layers[1](lm.layers[0](x)).detach()
    aux = lm.aux[1]
    ctx = LossContext(layer=1, num_layers=4, options=lm.plan.config["rule_options"], inputs=x, mean=MEAN, std=STD)
    loss = lm.rule.loss(aux, h, y, ctx)
    wx, wy = loss_weights(1, 4, (5.0, 0.2), (0.05, 0.5))
    image = (x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)).clamp(0, 1)
    up = F.interpolate(aux.to_map(h), size=(32, 32), mode="bilinear", align_corners=True)
    manual = wx * F.binary_cross_entropy(torch.sigmoid(aux.decoder(up)), image) + wy * F.cross_entropy(aux(h), y)
    assert torch.allclose(loss, manual, rtol=1e-4, atol=1e-5)


def test_predsim_loss_is_the_weighted_sum(cifar_plans):
    lm = cifar_plans["predsim"]
    x, y = _batch((3, 32, 32), n=6)
    h = lm.layers[0](x).detach()
    aux = lm.aux[0]
    ctx = LossContext(layer=0, num_layers=4, options=lm.plan.config["rule_options"])
    loss = lm.rule.loss(aux, h, y, ctx)
    s = aux.sim(h).flatten(2).std(dim=2)  # C=16 > 3 and H > 1: per-channel std over space
    s = F.normalize(s - s.mean(1, keepdim=True), dim=1)
    t = F.one_hot(y, 10).float()
    t = F.normalize(t - t.mean(1, keepdim=True), dim=1)
    manual = 0.99 * F.mse_loss(s @ s.t(), t @ t.t()) + 0.01 * F.cross_entropy(aux(h), y)
    assert torch.allclose(loss, manual, rtol=1e-4, atol=1e-6)
    assert similarity_matrix(torch.randn(5, 2, 1, 1)).shape == (5, 5)  # C <= 3: flattened


def test_infopro_needs_the_normalisation(cifar_plans):
    lm = cifar_plans["infopro"]
    x, y = _batch((3, 32, 32))
    with pytest.raises(ConversionError, match="mean= and std=") as info:
        lm.local_step(x, y)
    assert "\n" not in str(info.value)
    with pytest.raises(ConversionError, match="one per input channel"):
        lm.local_step(x, y, mean=(0.5, 0.5), std=STD)


# -- errors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"rule": "dlg"}, "unknown rule 'dlg'; accepted rules: auglocal, dgl, greedy, infopro, predsim"),
    ({"rule": "infopro", "rule_options": {"x3": 1.0}}, "rule 'infopro' has no option 'x3'; its options are: decoder, x1, x2, y1, y2"),
    ({"rule": "dgl", "rule_options": {"x1": 0.0}}, "its options are: y1, y2"),
    ({"rule": "predsim", "rule_options": {"dim_in_decoder": "big"}}, "must be int"),
])
def test_wrong_rule_or_option_is_one_line(kwargs, match):
    with pytest.raises(ConversionError, match=re.escape(match)) as info:
        auglocal_fx.convert(cifar_cnn(), layers=4, input_size=(3, 32, 32), **kwargs)
    assert "\n" not in str(info.value)


def test_registry_lists_the_rules():
    assert set(RULES) <= set(list_rules()) and list_rules()[0] == "auglocal"
    assert get_rule("infopro").needs_input and not get_rule("dgl").needs_input


# -- the documented custom rule ------------------------------------------------------------------------------------
def test_custom_rule_example_in_the_docs():
    text = (pathlib.Path(__file__).parent.parent / "docs" / "rules.md").read_text()
    section = text.split("## Writing your own rule", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    try:
        exec(compile(code, "docs/rules.md", "exec"), namespace)
        lm = namespace["lm"]
        assert lm.plan.config["rule"] == "conv_probe" and "conv_probe" in list_rules()
        assert all(p.grad is not None for p in lm.parameters())
        spec = lm.plan.aux[0]
        assert spec.params == sum(p.numel() for p in lm.aux[0].parameters()) and spec.flops > 0
    finally:
        _RULES.pop("conv_probe", None)


def test_infopro_progressive_decoder_at_imagenet_size():
    """Above 64 px InfoPro uses its ImageNet decoder (1x1 to 128, x2 upsampling steps): the one-jump decoder would
    upsample a 2048-channel map to 224x224 (26 GB at batch 64); the loss compares at the decoder's resolution."""
    model = torchvision.models.resnet18(num_classes=10)
    lm = auglocal_fx.convert(model, layers=3, rule="infopro", input_size=(3, 128, 128))
    sides = [a.net["map"][1] for a in lm.plan.aux]
    assert [a.net["upsamplings"] for a in lm.plan.aux] == [min(3, math.ceil(math.log2(128 / h))) for h in sides]
    aux = lm.aux[0]
    c = lm.plan.aux[0].net["map"][0]
    decoder = sum(p.numel() for p in aux.decoder.parameters())
    assert decoder == c * 128 + 2 * 128 + 128 * 32 * 9 + 2 * 32 + 32 * 12 * 9 + 2 * 12 + 12 * 3 * 9
    x, y = torch.randn(2, 3, 128, 128), torch.tensor([1, 2])
    losses = lm.local_step(x, y, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert all(torch.isfinite(v) for v in losses)
    small = auglocal_fx.convert(model, layers=3, rule="infopro", input_size=(3, 32, 32))
    assert [a.net["upsamplings"] for a in small.plan.aux] == [0, 0]  # CIFAR size: the reference's decoder
    forced = auglocal_fx.convert(model, layers=3, rule="infopro", input_size=(3, 32, 32),
                                 rule_options={"decoder": "progressive"})
    assert forced.plan.aux[0].net["upsamplings"] >= 1

