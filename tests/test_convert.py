"""The converter core: structure, AugLocal aux nets, local training semantics, export, plans and errors."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
import torchvision

import auglocal_fx
from auglocal_fx import ConversionError, PlanMismatchError, TraceError
from auglocal_fx.memory import SavedTensorTracker

from _models import FeatureExtractor, FunctionalNet, GatedNet, TwoOutputs, UntraceableRoot


@pytest.fixture(scope="module")
def resnet50_local():
    return auglocal_fx.convert(torchvision.models.resnet50(), layers=17, input_size=(3, 64, 64))


@pytest.fixture(scope="module")
def resnet18():
    return torchvision.models.resnet18(num_classes=10)


def test_resnet50_seventeen_layers(resnet50_local):
    lm = resnet50_local
    plan = lm.plan
    assert len(lm.layers) == 17 and len(lm.aux) == 16
    first = plan.units[plan.layers[0].units[0]]
    assert first.modules == ["conv1", "bn1", "relu", "maxpool"]
    stages = [f"layer{s}.{b}" for s, n in zip((1, 2, 3, 4), (3, 4, 6, 3)) for b in range(n)]
    assert [plan.units[layer.units[0]].name for layer in plan.layers[1:]] == stages
    assert all(len(layer.units) == 1 for layer in plan.layers)
    expected = auglocal_fx.depth_schedule(17, 2, 0.5)
    assert [a.depth for a in plan.aux] == expected
    for k, aux in enumerate(plan.aux):
        assert aux.units == auglocal_fx.select_aux_units(k, 17, expected[k])
    # The last layer ends with the head: global pooling and fc.
    assert plan.head.modules == ["avgpool", "fc"]


def test_layers_share_parameters_and_keys(resnet50_local):
    lm = resnet50_local
    src = lm.source_model
    assert lm.layers[1].get_submodule("layer1.0.conv1") is src.layer1[0].conv1
    backbone = lm.backbone_state_dict()
    assert set(backbone) == set(src.state_dict())
    assert not set(map(id, lm.backbone_parameters())) & set(map(id, lm.aux_parameters()))


def test_aux_nets_copy_units_and_adapt_shapes(resnet50_local):
    lm = resnet50_local
    aux0 = lm.aux[0]
    # aux 0 = adapter, copy of unit 8 (layer3.0), adapter, copy of unit 16 (layer4.2), copy of the head.
    copied = [m for m in aux0.body if isinstance(m, torch.fx.GraphModule)]
    assert len(copied) == 3
    copied_conv = copied[0].get_submodule("layer3.0.conv1")
    assert torch.equal(copied_conv.weight, lm.source_model.layer3[0].conv1.weight)
    assert copied_conv.weight is not lm.source_model.layer3[0].conv1.weight
    x = torch.randn(2, 64, 16, 16)  # layer 0's output at 64x64 input
    assert aux0.eval()(x).shape == (2, 1000)


def test_eval_forward_equals_original(resnet18):
    lm = auglocal_fx.convert(resnet18, layers=9, input_size=(3, 32, 32))
    x = torch.randn(3, 3, 32, 32)
    resnet18.eval(), lm.eval()
    with torch.no_grad():
        assert torch.equal(resnet18(x), lm(x))


def test_caller_model_is_not_changed(resnet18):
    before = copy.deepcopy(resnet18.state_dict())
    resnet18.train()
    lm = auglocal_fx.convert(resnet18, layers=4, input_size=(3, 32, 32))
    opt = torch.optim.SGD(lm.parameters(), lr=0.5)
    lm.local_step(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    opt.step()
    assert resnet18.training
    after = resnet18.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_local_step_gradients_stay_inside_each_layer(resnet18):
    torch.manual_seed(0)
    lm = auglocal_fx.convert(resnet18, layers=5, input_size=(3, 32, 32))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    losses = lm.local_step(x, y)
    assert len(losses) == 5 and all(loss.dim() == 0 and not loss.requires_grad for loss in losses)
    got = {id(p): p.grad.clone() for p in lm.parameters()}
    assert all(g is not None for g in got.values())
    # Recompute each layer's gradient from its own loss alone: equal means nothing else reached it.
    h = x
    for k, layer in enumerate(lm.layers):
        lm.zero_grad(set_to_none=True)
        out = layer(h)
        logits = out if k == len(lm.layers) - 1 else lm.aux[k](out)
        F.cross_entropy(logits, y).backward()
        for p in lm.local_parameters(k):
            assert torch.allclose(p.grad, got[id(p)], rtol=1e-5, atol=1e-7), f"layer {k} got gradient from elsewhere"
        h = out.detach()


def test_local_step_input_boundary_has_no_grad(resnet18):
    lm = auglocal_fx.convert(resnet18, layers=3, input_size=(3, 32, 32))
    seen = []
    for layer in lm.layers[1:]:
        layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].requires_grad))
    lm.local_step(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))
    assert seen == [False, False]


def test_every_parameter_gets_a_gradient_functional_model():
    model = FunctionalNet()
    lm = auglocal_fx.convert(model, layers=3, input_size=(3, 16, 16))
    model.eval(), lm.eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), lm(x))
    lm.train()
    lm.local_step(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))
    assert all(p.grad is not None for p in lm.parameters())
    # Raw parameters read with get_attr belong to the layer that uses them.
    assert lm.layers[0].w1 is lm.source_model.w1


def test_untraceable_block_becomes_leaf():
    model = GatedNet()
    lm = auglocal_fx.convert(model, layers=4, input_size=(3, 16, 16))
    assert lm.plan.trace["auto_leaves"] == ["blocks.0", "blocks.1", "blocks.2"]
    model.eval(), lm.eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), lm(x))
    info = auglocal_fx.inspect_model(model, input_size=(3, 16, 16))
    assert info.leaf_modules_added == ["blocks.0", "blocks.1", "blocks.2"]


def test_user_leaf_modules_by_class_name():
    lm = auglocal_fx.convert(GatedNet(), layers=2, input_size=(3, 16, 16), leaf_modules=["DynamicGate"])
    assert lm.plan.trace["auto_leaves"] == []


def test_fewer_layers_balance_flops(resnet18):
    lm = auglocal_fx.convert(resnet18, layers=3, input_size=(3, 32, 32))
    flops = [layer.flops for layer in lm.plan.layers]
    assert sum(len(layer.units) for layer in lm.plan.layers) == 9
    assert max(flops) < 0.6 * sum(flops)


def test_more_layers_cut_inside_blocks(resnet18):
    info = auglocal_fx.inspect_model(resnet18, input_size=(3, 32, 32))
    lm = auglocal_fx.convert(resnet18, layers=info.max_layers, input_size=(3, 32, 32))
    assert len(lm.layers) == info.max_layers > 9
    x = torch.randn(2, 3, 32, 32)
    resnet18.eval(), lm.eval()
    assert torch.equal(resnet18(x), lm(x))
    with pytest.raises(ConversionError, match=f"at most {info.max_layers}"):
        auglocal_fx.convert(resnet18, layers=info.max_layers + 1, input_size=(3, 32, 32))


def test_explicit_cuts(resnet18):
    lm = auglocal_fx.convert(resnet18, layers=4, cuts=["layer1", "layer2", "layer3"], input_size=(3, 32, 32))
    names = [[lm.plan.units[u].name for u in layer.units] for layer in lm.plan.layers]
    assert names[1] == ["layer2.0", "layer2.1"] and names[3] == ["layer4.0", "layer4.1"]
    with pytest.raises(ConversionError, match="Nearby valid cuts"):
        auglocal_fx.convert(resnet18, layers=2, cuts=["layer1.0.conv1"], input_size=(3, 32, 32))
    with pytest.raises(ConversionError, match="names no module"):
        auglocal_fx.convert(resnet18, layers=2, cuts=["nope"], input_size=(3, 32, 32))


def test_aux_init_fresh_reinitialises(resnet18):
    lm = auglocal_fx.convert(resnet18, layers=3, aux_init="fresh", input_size=(3, 32, 32))
    copied = [m for m in lm.aux[0].body if isinstance(m, torch.fx.GraphModule)][-1]  # the head copy
    assert not torch.equal(copied.fc.weight, lm.source_model.fc.weight)


def test_export_returns_original_architecture_with_trained_weights(resnet18):
    lm = auglocal_fx.convert(resnet18, layers=4, input_size=(3, 32, 32))
    opt = torch.optim.SGD(lm.parameters(), lr=0.1)
    lm.local_step(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    opt.step()
    exported = lm.export()
    assert type(exported) is type(resnet18)
    assert list(exported.state_dict()) == list(resnet18.state_dict())
    assert torch.equal(exported.layer3[0].conv1.weight, lm.layers[2].get_submodule("layer3.0.conv1").weight)
    assert not torch.equal(exported.layer3[0].conv1.weight, resnet18.layer3[0].conv1.weight)
    x = torch.randn(2, 3, 32, 32)
    exported.eval(), lm.eval()
    assert torch.equal(exported(x), lm(x))


def test_parameter_groups(resnet18):
    lm = auglocal_fx.convert(resnet18, layers=3, input_size=(3, 32, 32))
    groups = lm.parameter_groups()
    assert [g["name"] for g in groups] == ["backbone", "aux"]
    assert sum(len(g["params"]) for g in groups) == len(list(lm.parameters()))


def test_local_step_under_autocast(resnet18):
    lm = auglocal_fx.convert(resnet18, layers=3, input_size=(3, 32, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = lm.local_step(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))
    assert all(torch.isfinite(loss) for loss in losses)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lm.parameters())


def test_plan_is_json_and_reapplies(resnet18):
    lm = auglocal_fx.convert(resnet18, layers=5, input_size=(3, 32, 32))
    data = json.loads(json.dumps(lm.plan.to_dict()))
    plan = auglocal_fx.Plan.from_dict(data)
    assert plan == lm.plan
    rebuilt = auglocal_fx.apply_plan(torchvision.models.resnet18(num_classes=10), plan)
    assert rebuilt.plan.layer_cuts == lm.plan.layer_cuts
    with pytest.raises(PlanMismatchError, match="does not match"):
        auglocal_fx.apply_plan(torchvision.models.resnet34(num_classes=10), plan)
    with pytest.raises(PlanMismatchError, match="format version"):
        auglocal_fx.Plan.from_dict({**data, "format_version": 99})


def test_summary_lists_every_layer(resnet18):
    lm = auglocal_fx.convert(resnet18, layers=9, input_size=(3, 32, 32))
    rows = lm.summary_rows()
    assert len(rows) == 9 and rows[-1]["aux_depth"] is None and rows[0]["aux_units"] == [4, 8]
    text = lm.summary()
    assert "layer1.0" in text and "aux_params" in text
    json.dumps(rows)


def test_inspect_reports_units_cuts_head(resnet18):
    info = auglocal_fx.inspect_model(resnet18, input_size=(3, 32, 32))
    assert len(info.units) == 9
    assert "layer1.0.relu_1" not in info.valid_cuts and "maxpool" in info.valid_cuts
    assert info.head["modules"] == ["avgpool", "fc"]
    json.dumps(info.to_dict())


def test_inception_training_only_aux_logits_are_handled():
    model = torchvision.models.inception_v3(num_classes=10, aux_logits=True, init_weights=False)
    model.train()
    lm = auglocal_fx.convert(model, layers=4, input_size=(3, 80, 80))
    lm.local_step(torch.randn(2, 3, 80, 80), torch.randint(0, 10, (2,)))
    assert all(p.grad is not None for p in lm.parameters())
    assert "AuxLogits.fc.weight" in lm.export().state_dict()


def test_local_memory_is_a_third_of_backprop():
    lm = auglocal_fx.convert(torchvision.models.resnet50(), layers=17)
    x, y = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))
    with SavedTensorTracker() as bp:
        lm.bp_step(x, y)
    lm.zero_grad(set_to_none=True)
    with SavedTensorTracker() as local:
        lm.local_step(x, y)
    assert local.current_bytes == 0 and bp.current_bytes == 0  # every graph was freed
    assert local.peak_bytes <= 0.35 * bp.peak_bytes, (local.peak_bytes, bp.peak_bytes)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layers=0), "layers must be an integer >= 1"),
        (dict(layers=2.5), "layers must be an integer"),
        (dict(layers=3, aux_depth=0), "aux_depth must be an integer >= 1"),
        (dict(layers=3, pyramid=1.5), r"pyramid must be a number in \[0, 1\]"),
        (dict(layers=3, aux_init="random"), "aux_init must be one of copy, fresh"),
        (dict(layers=3, input_size=(3, 32)), "input_size must be three positive integers"),
        (dict(layers=3, input_size="3x32x32"), "input_size must be three positive integers"),
        (dict(layers=3, input_size=(1, 32, 32)), "Check input_size"),
        (dict(layers=3, leaf_modules=["NoSuchThing"]), "neither a module class"),
    ],
)
def test_bad_options_explain_themselves(resnet18, kwargs, match):
    kwargs.setdefault("input_size", (3, 32, 32))
    with pytest.raises(ConversionError, match=match):
        auglocal_fx.convert(resnet18, **kwargs)


def test_bad_models_explain_themselves():
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        auglocal_fx.convert("resnet18", layers=2)
    with pytest.raises(TraceError, match="in the model's own forward"):
        auglocal_fx.convert(UntraceableRoot(), layers=2, input_size=(3, 16, 16))
    with pytest.raises(ConversionError, match="no classifier head"):
        auglocal_fx.convert(FeatureExtractor(), layers=2, input_size=(3, 16, 16))
    with pytest.raises(ConversionError, match="one logits tensor"):
        auglocal_fx.convert(TwoOutputs(), layers=2, input_size=(3, 16, 16))


@pytest.mark.parametrize(
    "name, layers, depth, checks",
    [
        ("resnet32", 16, 2, {0: [8, 15], 3: [9, 15], 13: [14, 15], 14: [15]}),
        ("resnet110", 55, 3, {0: [18, 36, 54], 26: [35, 45, 54], 27: [40, 54], 53: [54]}),
    ],
)
def test_paper_cifar_resnets_reproduce_reference_aux_nets(name, layers, depth, checks):
    from auglocal_fx.models import create_registered_model

    lm = auglocal_fx.convert(create_registered_model(name), layers=layers, aux_depth=depth, pyramid=0.5,
                             input_size=(3, 32, 32))
    plan = lm.plan
    assert plan.num_units == layers and all(len(layer.units) == 1 for layer in plan.layers)
    assert [a.depth for a in plan.aux] == auglocal_fx.depth_schedule(layers, depth, 0.5)
    for layer, units in checks.items():
        assert plan.aux[layer].units == units
    assert plan.head.modules == ["avgpool", "fc"]


def test_torchvision_model_converts_without_importing_timm():
    """timm's notrace registries are only read when timm is imported: a model built without timm cannot contain its
    modules, and importing it would add about half a second to the first conversion."""
    import subprocess
    import sys

    code = (
        "import sys, torchvision, auglocal_fx\n"
        "auglocal_fx.convert(torchvision.models.resnet18(), layers=3, input_size=(3, 64, 64))\n"
        "print('timm imported' if 'timm' in sys.modules else 'timm not imported')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "timm not imported"


def test_size_function_outputs_do_not_block_cuts():
    """A grid size returned by a leaf function is data (it would cross every block boundary) unless the function
    is registered with register_size_function; then each layer gets the example's value and checks its input."""
    import _models

    auglocal_fx.register_leaf_function(_models.pool_tokens_opaque)
    auglocal_fx.register_leaf_function(_models.pool_tokens_sized)
    auglocal_fx.register_size_function(_models.pool_tokens_sized, outputs=(1,))
    size = (3, 32, 32)

    opaque = auglocal_fx.inspect_model(_models.PoolingNet(sized=False), input_size=size)
    assert len(opaque.units) < 4  # the blocks merge: the size crosses their boundaries next to the tokens

    model = _models.PoolingNet(sized=True).eval()
    inspection = auglocal_fx.inspect_model(model, input_size=size)
    assert [u["name"] for u in inspection.units] == ["embed", "blocks.0", "blocks.1", "blocks.2"]
    lm = auglocal_fx.convert(model, layers=4, input_size=size).eval()
    for batch in (2, 3):
        x = torch.randn(batch, *size)
        with torch.no_grad():
            assert torch.equal(lm(x), model(x))
    lm.train().local_step(torch.randn(4, *size), torch.tensor([0, 1, 2, 3]))
    assert [n for n, p in lm.named_parameters() if p.grad is None] == []
    with pytest.raises(ValueError, match="per-sample shape"):
        lm.eval()(torch.randn(2, 3, 64, 64))  # the sizes were fixed for 32x32 inputs: a clear error


def test_register_size_function_rejects_bad_input():
    with pytest.raises(TypeError, match="register_size_function"):
        auglocal_fx.register_size_function(lambda x: x, outputs=())


def test_aux_units_never_write_into_their_input():
    """K=10 on resnet18 cuts layer4.1 before its ReLU(inplace=True); layer 5's aux net runs that ReLU right after
    a copy of layer4.0, whose own ReLU saved its output for backward: the copy must not write into it."""
    import torchvision

    from auglocal_fx._build import copy_input_before_inplace_use

    lm = auglocal_fx.convert(torchvision.models.resnet18(num_classes=10), layers=10, input_size=(3, 48, 48))
    assert [lm.plan.units[u].name for u in lm.plan.aux[5].units] == ["layer4.0", "layer4.1[1]"]
    x, y = torch.randn(4, 3, 48, 48), torch.randint(0, 10, (4,))
    losses = lm.local_step(x, y)  # raised "modified by an inplace operation" before
    assert all(torch.isfinite(loss) for loss in losses)
    h = torch.randn(4, 512, 2, 2)
    before = h.clone()
    lm.aux[8](h)  # a ReLU(inplace=True) first: the layer's output, which layer 9 reads next, stays as it was
    assert torch.equal(h, before)
    assert not copy_input_before_inplace_use(lm.layers[1])  # nothing to do where no op writes into the input
