"""The per-layer optimizer step (auglocal_fx.PerLayerOptimizer) and its use in training (optimizer.per_layer)."""
import copy

import pytest
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

import auglocal_fx
from auglocal_fx.optim import layer_param_groups
from auglocal_fx.train import train
from auglocal_fx.train._checkpoint import load_checkpoint

from test_train import tiny


def small_cnn(num_classes: int = 10) -> nn.Module:
    block = lambda cin, cout, stride: nn.Sequential(  # noqa: E731
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
    return nn.Sequential(block(3, 8, 1), block(8, 16, 2), block(16, 16, 1), block(16, 32, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


def _sgd(groups):
    return create_optimizer_v2(groups, opt="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3)


@pytest.mark.parametrize("rule", ["auglocal", "dgl"])
def test_per_layer_steps_equal_one_step_per_batch(rule, one_torch_thread):
    if rule not in auglocal_fx.list_rules():
        pytest.skip(f"rule {rule} is not registered")
    lm = auglocal_fx.convert(small_cnn(), layers=4, input_size=(3, 16, 16), rule=rule)
    reference = copy.deepcopy(lm)
    per_layer = auglocal_fx.PerLayerOptimizer(lm, _sgd)
    whole = _sgd(reference.parameter_groups())
    schedules = [create_scheduler_v2(o, sched="cosine", num_epochs=4)[0] for o in (per_layer, whole)]
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        for s in schedules:
            s.step(step)
        x = torch.randn(8, 3, 16, 16, generator=generator)
        y = torch.randint(0, 10, (8,), generator=generator)
        per_layer.zero_grad()
        losses_a = lm.local_step(x, y, after_backward=per_layer.after_backward)
        assert all(p.grad is None for p in lm.parameters())  # each layer's gradients were dropped after its step
        whole.zero_grad()
        losses_b = reference.local_step(x, y)
        whole.step()
        assert torch.equal(torch.stack(losses_a), torch.stack(losses_b))
    assert [g["lr"] for g in per_layer.param_groups] == [schedules[1].optimizer.param_groups[0]["lr"]] * len(
        per_layer.param_groups)
    for (name, a), b in zip(lm.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=0, atol=1e-6), name


def test_groups_are_split_per_layer_with_their_settings():
    lm = auglocal_fx.convert(small_cnn(), layers=3, input_size=(3, 16, 16))
    groups = [{"name": "backbone", "params": lm.backbone_parameters(), "weight_decay": 0.5},
              {"name": "aux", "params": lm.aux_parameters(), "weight_decay": 0.0}]
    per_layer = layer_param_groups(lm, groups)
    assert len(per_layer) == 3
    for k, layer_groups in enumerate(per_layer):
        ids = {id(p) for g in layer_groups for p in g["params"]}
        assert ids == {id(p) for p in lm.local_parameters(k)}
        assert {g["name"]: g["weight_decay"] for g in layer_groups} == (
            {"backbone": 0.5, "aux": 0.0} if k < 2 else {"backbone": 0.5})
    assert groups[0]["params"] == lm.backbone_parameters()  # the caller's groups are not changed


def test_calling_step_is_refused_and_state_round_trips():
    lm = auglocal_fx.convert(small_cnn(), layers=3, input_size=(3, 16, 16))
    opt = auglocal_fx.PerLayerOptimizer(lm, _sgd)
    with pytest.raises(RuntimeError, match="after_backward"):
        opt.step()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    lm.local_step(x, y, after_backward=opt.after_backward)
    other = auglocal_fx.PerLayerOptimizer(lm, _sgd)
    other.load_state_dict(opt.state_dict())
    assert other.state_dict()["per_layer"][0]["state"].keys() == opt.state_dict()["per_layer"][0]["state"].keys()
    with pytest.raises(ValueError, match="per-layer state"):
        other.load_state_dict(_sgd(lm.parameter_groups()).state_dict())


def test_tied_weights_across_layers_are_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.fc = nn.Linear(3, 10)

        def forward(self, x):
            x = torch.relu(self.conv(x))
            x = torch.relu(self.conv(x))  # the same conv in two local layers
            return self.fc(x.mean(dim=(2, 3)))

    lm = auglocal_fx.convert(Tied(), layers=2, input_size=(3, 8, 8))
    with pytest.raises(ValueError, match="tied weights"):
        auglocal_fx.PerLayerOptimizer(lm, _sgd)


def test_training_with_per_layer_optimizer_equals_one_optimizer(tmp_path):
    """`optimizer.per_layer: true` in a recipe: the same weights as one optimizer stepped once per batch."""
    common = dict(epochs=2, limit_train_batches=3, grad_clip=None)
    train(tiny(**common), output_dir=tmp_path / "whole", quiet=True)
    train(tiny(optimizer={"name": "sgd", "lr": 0.05, "per_layer": True}, **common), output_dir=tmp_path / "layer",
          quiet=True)
    a = load_checkpoint(tmp_path / "whole" / "auglocal" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "layer" / "auglocal" / "checkpoint.pt")["model"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=0, atol=1e-5), key
