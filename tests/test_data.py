"""Dataset sources in their own on-disk formats, task splits, tables and data cards (issue 2)."""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from robust_transfer.config import ConfigError, DataConfig, build
from robust_transfer.data import (FASHION_DEBIAN_ROOT, iter_image_batches, load_source, make_task_split,
                                  read_image_table, sha256_file, to_table, verify_card, write_json, write_table)

RNG = np.random.default_rng(0)


def _images(n, h, w, c):
    return RNG.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def _labels(n, classes):
    return np.arange(n) % classes  # every class present


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- loaders, each format
def _cifar_flat(images):  # CIFAR stores each image as 3072 bytes: the R plane, then G, then B
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def test_cifar10_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = [f"class{i}" for i in range(10)]
    pickle.dump({"label_names": names, "num_cases_per_batch": 4}, open(folder / "batches.meta", "wb"))
    train_imgs, train_lbls = [], []
    for i in range(1, 6):
        imgs, lbls = _images(4, 32, 32, 3), list(RNG.integers(0, 10, 4))
        pickle.dump({"batch_label": f"training batch {i} of 5", "data": _cifar_flat(imgs), "labels": lbls,
                     "filenames": [f"{i}_{j}.png" for j in range(4)]}, open(folder / f"data_batch_{i}", "wb"))
        train_imgs.append(imgs)
        train_lbls += lbls
    test_imgs = _images(3, 32, 32, 3)
    pickle.dump({"data": _cifar_flat(test_imgs), "labels": [1, 2, 3]}, open(folder / "test_batch", "wb"))

    out = load_source("cifar10", str(tmp_path))
    assert np.array_equal(out["train"].images, np.concatenate(train_imgs))
    assert out["train"].labels.tolist() == [int(v) for v in train_lbls]
    assert np.array_equal(out["test"].images, test_imgs) and out["test"].labels.tolist() == [1, 2, 3]
    assert out["train"].class_names == names


def test_cifar100_python_files(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"fine{i}" for i in range(100)]
    pickle.dump({"fine_label_names": names, "coarse_label_names": [f"c{i}" for i in range(20)]},
                open(folder / "meta", "wb"))
    data = {}
    for split, n in (("train", 6), ("test", 2)):
        imgs, fine = _images(n, 32, 32, 3), [int(v) for v in RNG.integers(0, 100, n)]
        pickle.dump({"data": _cifar_flat(imgs), "fine_labels": fine, "coarse_labels": [0] * n},
                    open(folder / split, "wb"))
        data[split] = (imgs, fine)
    out = load_source("cifar100", str(folder))  # the folder itself works as root too
    for split, (imgs, fine) in data.items():
        assert np.array_equal(out[split].images, imgs) and out[split].labels.tolist() == fine
    assert out["train"].class_names == names


def test_svhn_mat_files(tmp_path):
    from scipy.io import savemat

    data = {}
    for split, n in (("train", 5), ("test", 3)):
        imgs = _images(n, 32, 32, 3)
        digits = np.array([0, 1, 9, 5, 0][:n])
        # SVHN's .mat: X is (32, 32, 3, N), y is (N, 1) with 10 standing for the digit 0
        savemat(tmp_path / f"{split}_32x32.mat", {"X": imgs.transpose(1, 2, 3, 0),
                                                   "y": np.where(digits == 0, 10, digits).reshape(-1, 1)})
        data[split] = (imgs, digits)
    out = load_source("svhn", str(tmp_path))
    for split, (imgs, digits) in data.items():
        assert np.array_equal(out[split].images, imgs)
        assert out[split].labels.tolist() == digits.tolist()


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _write_fashion(root: Path, n_train=20, n_test=10) -> dict:
    raw = root / "FashionMNIST" / "raw"  # torchvision's layout
    raw.mkdir(parents=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs, lbls = _images(n, 28, 28, 1)[..., 0], _labels(n, 10)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", imgs)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", lbls)
        data[prefix] = (imgs, lbls)
    return data


def test_fashion_mnist_idx_torchvision_layout(tmp_path):
    data = _write_fashion(tmp_path)
    out = load_source("fashion_mnist", str(tmp_path))
    for split, prefix in (("train", "train"), ("test", "t10k")):
        imgs, lbls = data[prefix]
        assert np.array_equal(out[split].images[..., 0], imgs) and out[split].labels.tolist() == lbls.tolist()
    assert out["train"].images.shape[1:] == (28, 28, 1)
    assert out["train"].class_names[0] == "T-shirt/top"


def test_truncated_idx_file_is_one_clear_error(tmp_path):
    _write_fashion(tmp_path)
    path = tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(ConfigError, match="truncated"):
        load_source("fashion_mnist", str(tmp_path))


def _write_imagefolder(root: Path, classes=("cat", "dog", "emu"), per_class=3, shape=(6, 6, 3)) -> dict:
    written = {}
    for split in ("train", "test"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for j in range(per_class):
                img = _images(1, *shape)[0]
                (folder / f"{j}.png").write_bytes(_png(img))
                written.setdefault(split, []).append((img, classes.index(name)))
    return written


def test_imagefolder_tree_of_pngs(tmp_path):
    written = _write_imagefolder(tmp_path)
    out = load_source("imagefolder", str(tmp_path))
    for split, items in written.items():
        assert np.array_equal(out[split].images, np.stack([img for img, _ in items]))
        assert out[split].labels.tolist() == [lbl for _, lbl in items]
    assert out["train"].class_names == ["cat", "dog", "emu"]


def test_imagefolder_skips_hidden_files_and_folders(tmp_path):
    """A tree copied from macOS or opened in Jupyter: "._0.png" (AppleDouble metadata, not a PNG) and
    a ".ipynb_checkpoints" folder are neither images nor a class."""
    written = _write_imagefolder(tmp_path)
    for split in ("train", "test"):
        (tmp_path / split / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (tmp_path / split / ".ipynb_checkpoints").mkdir()
    out = load_source("imagefolder", str(tmp_path))
    assert out["train"].class_names == ["cat", "dog", "emu"]
    assert len(out["train"].labels) == len(written["train"]) and len(out["test"].labels) == len(written["test"])


def test_imagefolder_of_mixed_sizes_is_rejected(tmp_path):
    _write_imagefolder(tmp_path)
    (tmp_path / "train" / "cat" / "big.png").write_bytes(_png(_images(1, 9, 9, 3)[0]))
    with pytest.raises(ConfigError, match="differ in shape"):
        load_source("imagefolder", str(tmp_path))


def test_parquet_table_of_encoded_images(tmp_path):
    rows = [(_images(1, 5, 5, 1)[0], i % 2, "train" if i < 6 else "test") for i in range(9)]
    table = pa.table({"image": [_png(img) for img, _, _ in rows], "label": [lbl for _, lbl, _ in rows],
                      "split": [s for _, _, s in rows]})
    pq.write_table(table, tmp_path / "mine.parquet")
    out = load_source("parquet", str(tmp_path / "mine.parquet"))
    assert np.array_equal(out["train"].images, np.stack([img for img, _, s in rows if s == "train"]))
    assert out["test"].labels.tolist() == [lbl for _, lbl, s in rows if s == "test"]
    assert out["train"].images.shape[1:] == (5, 5, 1)

    # the same as two files in a folder
    folder = tmp_path / "both"
    folder.mkdir()
    for split in ("train", "test"):
        pq.write_table(table.filter(pa.compute.equal(table["split"], split)).drop(["split"]),
                       folder / f"{split}.parquet")
    again = load_source("parquet", str(folder))
    assert np.array_equal(again["train"].images, out["train"].images)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_parquet_table_is_one_clear_error(tmp_path, damage):
    path = tmp_path / "mine.parquet"
    pq.write_table(pa.table({"image": [_png(_images(1, 4, 4, 1)[0])] * 4, "label": [0, 1, 0, 1],
                             "split": ["train", "train", "test", "test"]}), path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2] if damage == "truncated" else b"PAR1" + b"\x00" * 64)
    with pytest.raises(ConfigError, match="not a readable Parquet table") as err:
        load_source("parquet", str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match="missing data file"):
        load_source("parquet", str(tmp_path / "nope.parquet"))
    with pytest.raises(ConfigError, match="train/<class>"):
        load_source("imagefolder", str(tmp_path / "nope"))
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(ConfigError, match="missing data file .*batches.meta"):
        load_source("cifar10", str(tmp_path))


# ----------------------------------------------------------------------------- task splits
def _digest(images):
    return {hashlib.sha1(img.tobytes()).hexdigest() for img in images}


def _check_split(split, cfg):
    n_src, n_tgt = len(cfg.source_classes), len(cfg.target_classes)
    for name in ("source_train", "source_test"):
        images, labels, orig, names = split[name]
        assert set(orig.tolist()) == set(cfg.source_classes) and set(labels.tolist()) == set(range(n_src))
        assert [cfg.source_classes[t] for t in labels] == orig.tolist()  # task label i is source_classes[i]
    for name in ("target_train", "target_fit", "target_val", "target_test"):
        _, labels, orig, _ = split[name]
        assert set(orig.tolist()) <= set(cfg.target_classes) and set(labels.tolist()) <= set(range(n_tgt))
        assert [cfg.target_classes[t] for t in labels] == orig.tolist()
    # exactly `shots` per target class, `val_shots` of them held out for tuning, the rest to fit
    for name, per_class in (("target_train", cfg.shots), ("target_val", cfg.val_shots),
                            ("target_fit", cfg.shots - cfg.val_shots)):
        counts = np.bincount(split[name][1], minlength=n_tgt)
        assert counts.tolist() == [per_class] * n_tgt, (name, counts)
    fit, val, train = (_digest(split[t][0]) for t in ("target_fit", "target_val", "target_train"))
    assert fit | val == train and not fit & val
    # no image of a training table is in a test table
    assert not _digest(split["target_train"][0]) & _digest(split["target_test"][0])
    assert not _digest(split["source_train"][0]) & _digest(split["source_test"][0])


def test_digits_task_split():
    cfg = build(DataConfig, {"dataset": "digits", "source_classes": [0, 1, 2, 3, 4], "target_classes": [9, 7, 5],
                             "shots": 6, "val_shots": 2, "target_test_size": 60, "seed": 3}, "data")
    split = make_task_split(cfg)
    _check_split(split, cfg)
    assert len(split["target_test"][1]) == 60
    assert split["source_train"][0].shape[1:] == (8, 8, 1)
    again = make_task_split(cfg)  # same seed, same split
    assert all(np.array_equal(again[k][0], split[k][0]) for k in split)
    other = make_task_split(build(DataConfig, {**cfg.__dict__, "seed": 4}, "data"))
    assert not np.array_equal(other["target_train"][0], split["target_train"][0])


@pytest.mark.skipif(not Path(FASHION_DEBIAN_ROOT).is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_task_split():
    cfg = build(DataConfig, {"dataset": "fashion_mnist", "shots": 20, "val_shots": 5, "source_train_size": 500,
                             "source_test_size": 200, "target_test_size": 300}, "data")
    split = make_task_split(cfg)
    _check_split(split, cfg)
    assert len(split["source_train"][1]) == 500 and len(split["target_test"][1]) == 300
    assert np.bincount(split["source_train"][1]).tolist() == [100] * 5  # stratified
    assert split["target_train"][3] == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def test_shots_larger_than_available():
    cfg = build(DataConfig, {"dataset": "digits", "shots": 400, "val_shots": 1}, "data")
    with pytest.raises(ConfigError, match=r"data.shots=400 is larger than the \d+ images available"):
        make_task_split(cfg)


def test_class_id_beyond_the_dataset():
    cfg = build(DataConfig, {"dataset": "digits", "target_classes": [5, 6, 12], "shots": 3, "val_shots": 1}, "data")
    with pytest.raises(ConfigError, match=r"data.target_classes: class ids \[12\] do not exist"):
        make_task_split(cfg)


def test_other_target_dataset_is_resized_to_the_source_shape(tmp_path):
    _write_imagefolder(tmp_path, classes=("a", "b"), per_class=4, shape=(16, 16, 3))
    cfg = build(DataConfig, {"dataset": "digits", "target_dataset": "imagefolder", "target_root": str(tmp_path),
                             "source_classes": [0, 1, 2], "target_classes": [0, 1], "shots": 3, "val_shots": 1},
                "data")
    split = make_task_split(cfg)
    for name in ("target_train", "target_test", "target_fit", "target_val"):
        assert split[name][0].shape[1:] == (8, 8, 1) and split[name][0].dtype == np.uint8
    assert split["target_train"][3] == ["a", "b"]


# ----------------------------------------------------------------------------- tables and cards
def test_table_round_trip_and_streaming(tmp_path):
    images, labels = _images(50, 8, 8, 1), _labels(50, 5)
    path = tmp_path / "t.parquet"
    write_table(to_table(images, labels, labels + 10, list("abcde")), path)
    back = read_image_table(path)
    assert np.array_equal(back.images, images) and back.labels.tolist() == labels.tolist()
    assert back.class_names == list("abcde")
    x, y = back.tensors()
    assert x.shape == (50, 1, 8, 8) and 0 <= x.min() and x.max() <= 1 and x.dtype.is_floating_point
    streamed = list(iter_image_batches(path, 16))
    assert [len(b.labels) for b in streamed] == [16, 16, 16, 2]
    assert np.array_equal(np.concatenate([b.images for b in streamed]), images)


def test_data_card_detects_a_changed_table(tmp_path):
    path = tmp_path / "t.parquet"
    write_table(to_table(_images(10, 4, 4, 1), _labels(10, 2), _labels(10, 2), ["a", "b"]), path)
    card = tmp_path / "card.json"
    write_json({"tables": {"t": {"sha256": sha256_file(path)}}}, card)
    assert verify_card(card, {"t": path})["tables"]["t"]["sha256"]
    write_table(to_table(_images(10, 4, 4, 1), _labels(10, 2), _labels(10, 2), ["a", "b"]), path)
    with pytest.raises(ConfigError, match="does not match its data card"):
        verify_card(card, {"t": path})
    with pytest.raises(ConfigError, match="missing data card"):
        verify_card(tmp_path / "nope.json", {"t": path})


# ----------------------------------------------------------------------------- streaming prepare
def _parquet_source(folder: Path, n_train: int = 60, n_test: int = 30, bad_test_row=None) -> dict:
    """A user's dataset as train.parquet/test.parquet (5 classes of 6x6 grey PNGs); returns the images."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        imgs = _images(n, 6, 6, 1)
        blobs = [_png(img) for img in imgs]
        if split == "test" and bad_test_row is not None:
            blobs[bad_test_row] = b"not a png"
        pq.write_table(pa.table({"image": pa.array(blobs, pa.binary()), "label": _labels(n, 5)}),
                       folder / f"{split}.parquet")
        out[split] = imgs
    return out


def test_a_parquet_source_is_read_only_where_a_table_takes_its_images(tmp_path, monkeypatch):
    """Loading a Parquet dataset reads its labels; the images stay in the file until a table is
    written, a bounded batch at a time, in row groups of IMAGE_ROW_GROUP rows (what a streaming reader
    holds): the written tables equal what the whole arrays give."""
    from robust_transfer import data

    written = _parquet_source(tmp_path / "ds", bad_test_row=2)  # class 2: no table takes it, never decoded
    out = load_source("parquet", str(tmp_path / "ds"))
    assert isinstance(out["train"].images, data.ParquetImages) and out["train"].images.shape == (60, 6, 6, 1)
    assert np.array_equal(out["train"].images, written["train"])
    cfg = build(DataConfig, {"dataset": "parquet", "root": str(tmp_path / "ds"), "source_classes": [0, 1],
                             "target_classes": [3, 4], "shots": 4, "val_shots": 1, "seed": 0}, "data")
    split = make_task_split(cfg)
    monkeypatch.setattr(data, "IMAGE_ROW_GROUP", 8)
    for name, (images, labels, orig, names) in split.items():
        assert isinstance(images, data.ParquetImages)
        path = tmp_path / f"{name}.parquet"
        data.write_image_table(images, labels, orig, names, path)
        back = read_image_table(path)
        source = written["train" if name in ("source_train", "target_train", "target_fit", "target_val") else "test"]
        assert np.array_equal(back.images, source[images.rows]) and back.labels.tolist() == labels.tolist()
        assert pq.ParquetFile(path).metadata.num_row_groups == -(-len(labels) // 8)
    _check_split({k: (np.asarray(v[0]), *v[1:]) for k, v in split.items()}, cfg)


def test_a_bad_image_stops_prepare_in_one_line_and_replaces_no_table(tmp_path):
    """Images are decoded as the tables are written: one that is not an image stops the stage, naming
    its row, after some tables are done; every table and the card stay as they were."""
    from rt_testlib import run_stage, smoke_params, write_params

    _parquet_source(tmp_path / "ds", bad_test_row=3)  # label 3: a target class, in target_test
    params = smoke_params(data={"dataset": "parquet", "root": str(tmp_path / "ds"), "source_classes": [0, 1],
                                "target_classes": [3, 4], "shots": 4, "val_shots": 1, "source_train_size": None,
                                "source_test_size": None, "target_test_size": None})
    write_params(tmp_path, params)
    (tmp_path / "data").mkdir()
    before = {n: f"old {n}".encode() for n in ("source_train", "source_test", "target_train", "card")}
    for name, blob in before.items():
        (tmp_path / "data" / (f"{name}.json" if name == "card" else f"{name}.parquet")).write_bytes(blob)
    proc = run_stage(tmp_path, "prepare")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'ds'} row 3 is not a readable image"
    for name, blob in before.items():
        assert (tmp_path / "data" / (f"{name}.json" if name == "card" else f"{name}.parquet")).read_bytes() == blob
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(
        f"{n}.json" if n == "card" else f"{n}.parquet" for n in before)  # no temporary left


def test_parquet_images_of_another_shape_in_a_later_batch_are_rejected(tmp_path):
    """The shape check spans batches: an image that differs from the batches before it stops the read."""
    imgs = [_images(1, 6, 6, 1)[0]] * 4 + [_images(1, 7, 7, 1)[0]] * 2  # the third batch of two: all 7x7
    pq.write_table(pa.table({"image": [_png(i) for i in imgs], "label": [0, 1] * 3}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"image": [_png(imgs[0])] * 2, "label": [0, 1]}), tmp_path / "test.parquet")
    images = load_source("parquet", str(tmp_path))["train"].images
    with pytest.raises(ConfigError, match=r"images differ in shape \[\(6, 6, 1\), \(7, 7, 1\)\]"):
        list(images.batches(2))
