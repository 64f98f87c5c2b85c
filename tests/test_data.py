"""Data sets, IDX files, transforms and the (seed, epoch)-ordered loaders. Nothing here downloads anything."""
import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from auglocal_fx.data import (DEBIAN_FASHION_MNIST, DataError, EpochSampler, create_dataset, create_loader,
                              create_transforms, dataset_info, list_datasets, num_classes_of, read_idx,
                              seeded_subset, set_loader_epoch)


def _write_idx(path, array, *, gz):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _eval_tf(info, size=None):
    size = size or info.img_size
    return create_transforms(input_size=(info.in_chans, size, size), is_training=False, mean=info.mean, std=info.std)


def test_catalogue():
    assert {"digits", "fashion_mnist", "cifar10", "cifar100", "svhn", "stl10", "imagenet",
            "imagefolder"} <= set(list_datasets())
    with pytest.raises(DataError, match="unknown data set 'mnist'"):
        dataset_info("mnist")


def test_digits_fixed_split():
    info = dataset_info("digits")
    train = create_dataset("digits", split="train", transform=_eval_tf(info))
    test = create_dataset("digits", split="test", transform=_eval_tf(info))
    assert (len(train), len(test)) == (1437, 360)
    assert num_classes_of(train) == 10
    x, y = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    again = create_dataset("digits", split="train", transform=_eval_tf(info))
    assert torch.equal(again[5][0], train[5][0]) and again.targets == train.targets
    # the normalisation constants are the data's: train pixels come out near mean 0, std 1
    xs = torch.stack([train[i][0] for i in range(0, 1437, 7)])
    assert abs(float(xs.mean())) < 0.15 and 0.8 < float(xs.std()) < 1.2


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (12,), dtype=np.uint8)
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, gz=gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, gz=gz)
    assert np.array_equal(read_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}"), images)
    ds = create_dataset("fashion_mnist", split="test", root=tmp_path)
    assert len(ds) == 12 and ds.targets == labels.tolist() and ds.classes[0] == "T-shirt/top"
    img, _ = ds[3]
    assert isinstance(img, Image.Image) and np.array_equal(np.asarray(img), images[3])
    with pytest.raises(DataError, match="fashion_mnist not found under"):  # no train files: not there
        create_dataset("fashion_mnist", split="train", root=tmp_path)


def test_idx_bad_files(tmp_path):
    bad = tmp_path / "x-idx"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(DataError, match="truncated"):
        read_idx(short)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package():
    test = create_dataset("fashion_mnist", split="test")
    assert len(test) == 10_000 and num_classes_of(test) == 10
    assert np.asarray(test[0][0]).shape == (28, 28)


def test_missing_torchvision_data_is_not_downloaded(tmp_path):
    with pytest.raises(DataError, match="data.download: true"):
        create_dataset("cifar10", split="train", root=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing was fetched or written


def test_image_folder(tmp_path):
    for split in ("train", "val"):
        for cls in ("cat", "dog", "eel"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (20, 16), (i * 90, 10, 200)).save(tmp_path / split / cls / f"{i}.png")
    info = dataset_info("imagefolder")
    tf = create_transforms(input_size=(3, 24, 24), is_training=True, augment="rrc", mean=info.mean, std=info.std)
    ds = create_dataset("imagefolder", split="train", root=tmp_path, transform=tf)
    assert len(ds) == 6 and num_classes_of(ds) == 3 and ds[0][0].shape == (3, 24, 24)
    assert len(create_dataset("imagenet", split="test", root=tmp_path)) == 6
    with pytest.raises(DataError, match="data.eval_dir"):
        create_dataset("imagefolder", split="test", root=tmp_path, eval_dir="validation")
    with pytest.raises(DataError, match="data.root"):
        create_dataset("imagefolder", split="train")


@pytest.mark.parametrize("augment", ["none", "flip", "crop", "crop_flip", "rrc"])
def test_train_transforms(augment):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    tf = create_transforms(input_size=(3, 32, 32), is_training=True, augment=augment, native_size=32,
                           mean=(0.5,) * 3, std=(0.25,) * 3, re_prob=0.25 if augment == "crop" else 0.0)
    out = tf(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    up = create_transforms(input_size=(3, 64, 64), is_training=True, augment=augment, native_size=32,
                           mean=(0.5,) * 3, std=(0.25,) * 3)
    assert up(img).shape == (3, 64, 64)  # augment at native size, then resize


def test_eval_transform_is_exact_normalisation():
    arr = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    tf = create_transforms(input_size=(1, 8, 8), is_training=False, mean=(0.5,), std=(0.25,))
    expected = (torch.from_numpy(arr).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(tf(Image.fromarray(arr))[0], expected)
    with pytest.raises(ValueError, match="unknown augmentation"):
        create_transforms(input_size=(1, 8, 8), is_training=True, augment="mixup", mean=(0.5,), std=(0.25,))


def test_epoch_sampler_order_depends_only_on_seed_and_epoch():
    s = EpochSampler(50, seed=3)
    s.set_epoch(0)
    first = list(s)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    s2 = EpochSampler(50, seed=3)
    s2.set_epoch(0)
    assert list(s2) == first
    s2.set_epoch(1)
    assert list(s2) != first
    s.set_epoch(0, start=20)
    assert list(s) == first[20:] and len(s) == 30
    plain = EpochSampler(5, shuffle=False)
    assert list(plain) == [0, 1, 2, 3, 4]


def test_loader_resumes_mid_epoch():
    data = torch.utils.data.TensorDataset(torch.arange(40).float())
    loader = create_loader(data, batch_size=8, is_training=True, seed=1)
    set_loader_epoch(loader, 2)
    full = [b[0].tolist() for b in loader]
    set_loader_epoch(loader, 2, start_batch=3)
    assert [b[0].tolist() for b in loader] == full[3:]
    odd = create_loader(torch.utils.data.TensorDataset(torch.arange(10).float()), batch_size=4, is_training=True)
    assert len(odd) == 2  # training drops the last partial batch
    ev = create_loader(torch.utils.data.TensorDataset(torch.arange(10).float()), batch_size=4, is_training=False)
    assert [b[0].tolist() for b in ev][-1] == [8.0, 9.0]  # evaluation keeps every sample, in order


def test_seeded_subset():
    data = list(range(100))
    a, b = seeded_subset(data, 10, seed=0), seeded_subset(data, 10, seed=0)
    assert list(a) == list(b) and len(a) == 10 and len(set(a)) == 10
    assert seeded_subset(data, None) is data and seeded_subset(data, 1000) is data
