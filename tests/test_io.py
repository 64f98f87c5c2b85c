"""Artifacts: save/load round trips bit-exactly, refuse damaged files, never leave a half-written artifact."""
import json
import os
import shutil

import pytest
import safetensors
import safetensors.torch
import torch
import torchvision

import auglocal_fx
from auglocal_fx import io
from auglocal_fx.hub import create_model
from auglocal_fx.io import ArtifactError, export_backbone, load, read_manifest, save

INPUT = (3, 32, 32)


def _convert(name="resnet8", layers=3, **kwargs):
    return auglocal_fx.convert(create_model(name, num_classes=10), layers=layers, input_size=INPUT, **kwargs)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A saved, untrained artifact; tests that damage it work on a copy (see ``copy_of``)."""
    torch.manual_seed(0)
    lm = _convert()
    path = tmp_path_factory.mktemp("artifacts") / "r8"
    save(lm, path)
    return path


@pytest.fixture
def copy_of(artifact, tmp_path):
    def make(name="copy"):
        target = tmp_path / name
        shutil.copytree(artifact, target)
        return target

    return make


def _states(lm):
    return {**{f"model.{k}": v for k, v in lm.source_model.state_dict().items()},
            **{f"aux.{k}": v for k, v in lm.aux.state_dict().items()}}


def _assert_identical(a, b):
    sa, sb = _states(a), _states(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_round_trip_after_a_training_step(tmp_path):
    torch.manual_seed(0)
    lm = _convert(aux_init="fresh")
    optimizer = torch.optim.SGD(lm.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, *INPUT), torch.randint(0, 10, (8,))
    before = {k: v.clone() for k, v in _states(lm).items()}
    optimizer.zero_grad()
    lm.local_step(x, y)
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in _states(lm).items())  # the step changed something

    save(lm, tmp_path / "a")
    loaded = load(tmp_path / "a")
    assert type(loaded) is type(lm) and loaded.plan.to_dict() == lm.plan.to_dict()
    _assert_identical(lm, loaded)
    lm.eval(), loaded.eval()
    x = torch.randn(4, *INPUT)
    with torch.no_grad():
        assert torch.equal(lm(x), loaded(x))
    for a, b in zip(lm.layerwise_logits(x), loaded.layerwise_logits(x)):
        assert torch.equal(a, b)
    # Training goes on identically from the loaded model.
    lm.train(), loaded.train()
    for model in (lm, loaded):
        torch.manual_seed(1)
        model.zero_grad()
        model.local_step(x, y[:4])
    for (name, p), q in zip(lm.named_parameters(), loaded.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_round_trip_with_leaf_modules(tmp_path):
    lm = _convert(leaf_modules=["BasicBlock"])
    save(lm, tmp_path / "a")
    _assert_identical(lm, load(tmp_path / "a"))


def test_layout(artifact):
    assert sorted(os.listdir(artifact)) == ["auglocal.json", "model.safetensors"]  # no pickle, no temp files
    assert not [p for p in os.listdir(artifact.parent) if p.startswith(".")]
    doc = json.loads((artifact / "auglocal.json").read_text())
    assert doc["format"] == "auglocal-fx" and doc["format_version"] == 1
    assert set(doc["versions"]) == {"auglocal_fx", "torch", "torchvision", "timm"}
    assert doc["source"] == {"name": "auglocal:resnet8", "kwargs": {"num_classes": 10}}
    assert auglocal_fx.Plan.from_dict(doc["plan"]).num_layers == 3
    assert doc["weights"]["file"] == "model.safetensors"
    assert doc["weights"]["sha256"] == io._sha256(artifact / "model.safetensors")
    # An ordinary safetensors file: the reference reader takes it, keys under model./aux.
    tensors = safetensors.torch.load_file(str(artifact / "model.safetensors"))
    with safetensors.safe_open(str(artifact / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "pt"
    fresh = create_model("resnet8", num_classes=10)
    assert {k[len("model."):] for k in tensors if k.startswith("model.")} == set(fresh.state_dict())
    assert all(k.startswith(("model.", "aux.")) for k in tensors)


def test_writer_matches_the_reference_reader(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "f32": base, "tied": base, "view": base[1:3],  # aliases and overlapping views
        "t": base.t(),  # not contiguous
        "bf16": torch.randn(3, 5).to(torch.bfloat16), "i64": torch.tensor(7), "b": torch.tensor([True, False]),
        "u8": torch.arange(5, dtype=torch.uint8), "empty": torch.zeros(0, 3), "f16": torch.randn(2).half(),
    }
    clean, aliases = io._dedupe(tensors)
    assert aliases == {"tied": "f32"}
    sha = io._write_safetensors(tmp_path / "t.safetensors", clean, {"format": "pt"})
    assert sha == io._sha256(tmp_path / "t.safetensors")
    back = safetensors.torch.load_file(str(tmp_path / "t.safetensors"))
    assert back.keys() == clean.keys()
    for k, v in clean.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], tensors[k]), k


def test_tied_weights_are_stored_once_and_restored(tmp_path):
    lm = _convert()
    sd = lm.source_model.state_dict()
    # Tie two same-shaped tensors of the backbone (as a model with tied weights would have them).
    same = [(a, b) for a in sd for b in sd if a < b and sd[a].shape == sd[b].shape and sd[a].dim() == 4]
    a, b = same[0]
    owner_a, _, pa = a.rpartition(".")
    owner_b, _, pb = b.rpartition(".")
    mod_a, mod_b = lm.source_model.get_submodule(owner_a), lm.source_model.get_submodule(owner_b)
    setattr(mod_b, pb, getattr(mod_a, pa))
    save(lm, tmp_path / "tied")
    with safetensors.safe_open(str(tmp_path / "tied" / "model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()[io._ALIASES_KEY]) == {f"model.{b}": f"model.{a}"}
        assert f"model.{b}" not in f.keys()
    export_backbone(tmp_path / "tied", tmp_path / "tied.safetensors")
    exported = safetensors.torch.load_file(str(tmp_path / "tied.safetensors"))
    assert torch.equal(exported[a], exported[b])


def test_save_needs_a_source(tmp_path):
    lm = auglocal_fx.convert(torchvision.models.resnet18(num_classes=10), layers=2, input_size=INPUT)
    with pytest.raises(ArtifactError, match="create_model"):
        save(lm, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(ArtifactError, match="unknown model"):
        save(lm, tmp_path / "a", source={"name": "resnet_nope", "kwargs": {}})
    with pytest.raises(ArtifactError, match="JSON"):
        save(lm, tmp_path / "a", source={"name": "resnet18", "kwargs": {"norm_layer": torch.nn.BatchNorm2d}})
    save(lm, tmp_path / "a", source={"name": "tv:resnet18", "kwargs": {"num_classes": 10}})
    _assert_identical(lm, load(tmp_path / "a"))


def test_save_rejects_other_objects(tmp_path):
    with pytest.raises(TypeError, match="LocalModel"):
        save(torch.nn.Linear(2, 2), tmp_path / "a")


def test_save_does_not_change_the_model(tmp_path):
    lm = _convert()
    before = {k: v.clone() for k, v in _states(lm).items()}
    plan = lm.plan.to_dict()
    save(lm, tmp_path / "a")
    assert lm.plan.to_dict() == plan
    assert all(torch.equal(before[k], v) for k, v in _states(lm).items())


def test_existing_targets(tmp_path, artifact):
    lm = _convert()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not empty"):
        save(lm, other)
    assert os.listdir(other) == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="not a folder"):
        save(lm, tmp_path / "file")
    (tmp_path / "empty").mkdir()
    save(lm, tmp_path / "empty")  # an empty folder is fine
    target = tmp_path / "art"
    shutil.copytree(artifact, target)
    (target / "train.log").write_text("log")
    with pytest.raises(ArtifactError, match="overwrite"):
        save(lm, target)
    assert (target / "model.safetensors").read_bytes() == (artifact / "model.safetensors").read_bytes()
    save(lm, target, overwrite=True)
    _assert_identical(lm, load(target))
    assert (target / "train.log").read_text() == "log"  # other files in the folder are kept
    assert sorted(p for p in os.listdir(target)) == ["auglocal.json", "model.safetensors", "train.log"]


@pytest.mark.parametrize("fail_in", ["_write_safetensors", "_write_json", "_install"])
def test_a_crash_mid_save_leaves_nothing_that_loads(tmp_path, artifact, monkeypatch, fail_in):
    lm = _convert()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, fail_in, crash)
    with pytest.raises(OSError, match="disk full"):
        save(lm, tmp_path / "new")
    assert os.listdir(tmp_path) == []  # no artifact, no temp folder left behind
    target = tmp_path / "old"
    shutil.copytree(artifact, target)
    with pytest.raises(OSError, match="disk full"):
        save(lm, target, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["old"]
    assert (target / "model.safetensors").read_bytes() == (artifact / "model.safetensors").read_bytes()
    load(target)  # the old artifact is intact


def test_corrupt_weights(copy_of):
    truncated = copy_of("truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="sha256") as info:
        load(truncated)
    assert str(weights) in str(info.value)
    flipped = copy_of("flipped")
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="truncated, damaged or was replaced"):
        load(flipped)
    missing = copy_of("missing")
    (missing / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="model.safetensors is missing"):
        load(missing)


def _edit_manifest(path, edit):
    doc = json.loads((path / "auglocal.json").read_text())
    edit(doc)
    (path / "auglocal.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(format_version=2), "newer auglocal-fx"),
        (lambda d: d.update(format="something-else"), "not an auglocal-fx manifest"),
        (lambda d: d.pop("source"), "'source' entry is missing"),
        (lambda d: d["weights"].update(file="../model.safetensors"), "file name inside the artifact"),
        (lambda d: d["plan"].update(format_version=99), "plan cannot be read"),
        (lambda d: d["plan"]["units"].pop(), "plan"),
        (lambda d: d["source"]["kwargs"].update(num_classes=5), "does not match its plan"),
        (lambda d: d["source"].update(name="auglocal:resnet20"), "does not match its plan"),
        (lambda d: d["source"].update(name="resnet_nope"), "cannot rebuild the source model"),
    ],
)
def test_bad_manifest(copy_of, edit, message):
    path = copy_of()
    _edit_manifest(path, edit)
    with pytest.raises(ArtifactError, match=message) as info:
        load(path)
    assert str(path) in str(info.value)


def test_weights_from_another_artifact(copy_of, tmp_path):
    path = copy_of()
    save(_convert(layers=2), tmp_path / "k2")
    shutil.copy(tmp_path / "k2" / "model.safetensors", path / "model.safetensors")
    _edit_manifest(path, lambda d: d["weights"].update(sha256=io._sha256(path / "model.safetensors")))
    with pytest.raises(ArtifactError, match="model.safetensors does not match its plan"):
        load(path)


def test_unreadable_manifest(copy_of, tmp_path):
    path = copy_of()
    text = (path / "auglocal.json").read_text()
    (path / "auglocal.json").write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load(path)
    with pytest.raises(ArtifactError, match="does not exist"):
        load(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match="is a file"):
        load(path / "model.safetensors")
    (path / "auglocal.json").unlink()
    with pytest.raises(ArtifactError, match="auglocal.json is missing"):
        read_manifest(path)


def test_export_loads_into_a_fresh_model(artifact, tmp_path):
    out = export_backbone(artifact, tmp_path / "sub" / "backbone.safetensors")
    fresh = create_model("resnet8", num_classes=10)
    state = safetensors.torch.load_file(str(out))
    result = fresh.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = load(artifact)
    for k, v in loaded.source_model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    with pytest.raises(ArtifactError, match="overwrite"):
        export_backbone(artifact, out)
    export_backbone(artifact, out, overwrite=True)
    assert [p for p in os.listdir(out.parent)] == ["backbone.safetensors"]


def test_export_into_timm_pretrained_cfg_overlay(tmp_path):
    import timm

    lm = auglocal_fx.convert(create_model("timm:test_resnet", num_classes=10), layers=2)
    save(lm, tmp_path / "a")
    export_backbone(tmp_path / "a", tmp_path / "b.safetensors")
    # timm drops a classifier whose width differs from pretrained_cfg["num_classes"]: the overlay says it is 10.
    overlay = dict(file=str(tmp_path / "b.safetensors"), num_classes=10)
    model = timm.create_model("test_resnet", pretrained=True, num_classes=10, pretrained_cfg_overlay=overlay)
    for k, v in lm.source_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_export_checks_the_artifact(copy_of, tmp_path):
    path = copy_of()
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="sha256"):
        export_backbone(path, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
