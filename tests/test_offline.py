"""Pretrained weights and data set downloads with the network made unreachable by the test itself.

Two ways, neither assuming anything about this machine's network: name resolution and connections fail inside
this process (``no_network``), or every download goes through a proxy on a local port that was just closed. The
library caches (torch hub, Hugging Face hub) are empty folders of the test's, or hold weights the test wrote.
"""
import pickle
import socket
import time

import numpy as np
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

from auglocal_fx._network import unreachable_reason
from auglocal_fx.cli.main import main
from auglocal_fx.data import DataError, create_dataset
from auglocal_fx.hub import PretrainedWeightsError, create_model

TIMM_TINY = "test_resnet"  # timm's own test model: its weights live on the hub as timm/test_resnet.r160_in1k
FAST_S = 5.0  # "fails at once": the hub's own retries take about 40 s


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face hub caches, owned by the test."""
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.fixture
def no_network(monkeypatch):
    """Name resolution and every outgoing connection fail, as on a machine without a network; returns the hosts
    that were looked up."""
    asked = []

    def getaddrinfo(host, *args, **kwargs):
        asked.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def create_connection(address, *args, **kwargs):
        getaddrinfo(*address)  # as the real one does first

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    return asked


@pytest.fixture
def closed_proxy(monkeypatch):
    """Route every download through a proxy on a local port that nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = f"http://127.0.0.1:{port}"
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, proxy)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return port


def _timed(fn):
    started = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001  (the test inspects it)
        return exc, time.perf_counter() - started
    return None, time.perf_counter() - started


def _write_hf_cache(root, repo_id, state):
    """The Hugging Face hub cache layout: models--ORG--NAME/refs/main -> snapshots/<commit>/model.safetensors."""
    folder = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    safetensors.torch.save_file(state, str(folder / "snapshots" / commit / "model.safetensors"))


def _shifted(state):
    # Weights that differ from a fresh model's, so that loading them is visible.
    return {k: (v + 0.5) if v.is_floating_point() else v for k, v in state.items()}


# ------------------------------------------------------------------------------------------ pretrained weights


def test_timm_weights_not_cached_fail_at_once(caches, no_network):
    error, seconds = _timed(lambda: create_model(f"timm:{TIMM_TINY}", pretrained=True))
    assert isinstance(error, PretrainedWeightsError) and isinstance(error, OSError)
    assert seconds < FAST_S
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"cannot fetch the pretrained weights of timm:{TIMM_TINY} "
                              f"(timm/{TIMM_TINY}.r160_in1k from the Hugging Face hub): huggingface.co is unreachable")
    assert "pretrained_file=PATH" in message and str(caches / "hf") in message
    assert no_network == ["huggingface.co"]  # one look, no retries


def test_torchvision_weights_not_cached_fail_at_once(caches, no_network):
    import torchvision.models

    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    error, seconds = _timed(lambda: create_model("resnet18", pretrained=True))
    assert isinstance(error, PretrainedWeightsError) and seconds < FAST_S
    cached = caches / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    assert str(error) == (
        f"cannot fetch the pretrained weights of tv:resnet18 ({url}): download.pytorch.org is unreachable "
        "([Errno -2] Name or service not known), and they are not in the local cache; offline, pass a local weights "
        f"file with pretrained_file=PATH, or put that file at {cached}"
    )
    assert str(pickle.loads(pickle.dumps(error))) == str(error)  # crosses process boundaries intact


def test_hub_offline_switch_is_honoured(caches, no_network, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PretrainedWeightsError, match="offline switch HF_HUB_OFFLINE is on"):
        create_model(f"timm:{TIMM_TINY}", pretrained=True)
    assert no_network == []  # not even looked up


def test_timm_weights_in_the_hub_cache_load_offline(caches, no_network):
    import timm

    state = _shifted(timm.create_model(TIMM_TINY).state_dict())
    _write_hf_cache(caches / "hf", f"timm/{TIMM_TINY}.r160_in1k", state)
    started = time.perf_counter()
    model = create_model(f"timm:{TIMM_TINY}", pretrained=True)
    assert time.perf_counter() - started < FAST_S
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_torchvision_weights_in_the_torch_cache_load_offline(caches, no_network):
    import torchvision.models

    url = torchvision.models.SqueezeNet1_1_Weights.DEFAULT.url
    state = _shifted(torchvision.models.squeezenet1_1().state_dict())
    target = caches / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    model = create_model("squeezenet1_1", pretrained=True)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert no_network == []  # read from the cache: the network is never asked


def test_unreachable_through_a_closed_proxy(closed_proxy):
    reason = unreachable_reason("https://huggingface.co/timm/resnet18.a1_in1k", timeout=FAST_S)
    assert reason == (f"huggingface.co (through the proxy 127.0.0.1:{closed_proxy}) is unreachable "
                      "([Errno 111] Connection refused)")


# -------------------------------------------------------------------------------------------- command line


def _error_lines(result):
    assert "Traceback" not in result.output
    return [line for line in result.output.splitlines() if line.strip()]


def test_cli_convert_pretrained_offline(caches, closed_proxy):
    started = time.perf_counter()
    result = CliRunner().invoke(main, ["convert", f"timm:{TIMM_TINY}", "--layers", "2", "--pretrained"])
    assert time.perf_counter() - started < FAST_S
    assert result.exit_code == 1
    (line,) = _error_lines(result)
    assert line.startswith(f"Error: cannot fetch the pretrained weights of timm:{TIMM_TINY} ")
    assert "through the proxy" in line and "--pretrained-file PATH" in line and "pretrained_file=PATH" not in line


def test_cli_convert_torchvision_pretrained_offline(caches, no_network):
    result = CliRunner().invoke(main, ["convert", "resnet18", "--layers", "3", "--pretrained"])
    assert result.exit_code == 1
    (line,) = _error_lines(result)
    assert line.startswith("Error: cannot fetch the pretrained weights of tv:resnet18 (https://download.pytorch.org/")
    assert "--pretrained-file PATH" in line


def test_recipe_pretrained_offline(caches, no_network, tmp_path):
    args = ["train", "quickstart", "--set", f"model.name=timm:{TIMM_TINY}", "--set", "model.pretrained=true",
            "--set", "epochs=1", "-q", "-o", str(tmp_path / "run")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    (line,) = _error_lines(result)
    assert line.startswith(f"Error: cannot fetch the pretrained weights of timm:{TIMM_TINY} ")
    assert "model.pretrained_file: PATH instead of model.pretrained" in line


# ------------------------------------------------------------------------------------------------ data sets


def test_dataset_download_offline_fails_at_once(tmp_path, no_network):
    error, seconds = _timed(lambda: create_dataset("cifar10", split="train", root=tmp_path, download=True))
    assert isinstance(error, DataError) and seconds < FAST_S
    assert str(error) == (
        f"cannot download cifar10 into {tmp_path} from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz: "
        "www.cs.toronto.edu is unreachable ([Errno -2] Name or service not known); offline, set data.root to a "
        "folder that already holds it (as torchvision stores it), or download it there once online"
    )
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_dataset_on_disk_needs_no_network_with_download(tmp_path, no_network):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    labels = np.array([1, 2, 3], dtype=np.uint8)
    # IDX: magic (0, 0, dtype 0x08, ndim), then big-endian int32 sizes, then the bytes
    (raw / "t10k-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + np.array(images.shape, ">i4").tobytes()
                                                 + images.tobytes())
    (raw / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + np.array([3], ">i4").tobytes()
                                                 + labels.tobytes())
    dataset = create_dataset("fashion_mnist", split="test", root=tmp_path, download=True)
    assert len(dataset) == 3
    assert no_network == []


def test_recipe_download_offline(tmp_path, no_network):
    args = ["train", "quickstart", "--set", "data.name=cifar10", "--set", f"data.root={tmp_path / 'data'}",
            "--set", "data.download=true", "--set", "epochs=1", "-q", "-o", str(tmp_path / "run")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    (line,) = _error_lines(result)
    assert line.startswith("Error: cannot download cifar10 into ") and "set data.root to a folder" in line
