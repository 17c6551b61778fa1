"""Dataset sources -> Arrow tables; source/target task splits; few-shot sampling.

Every source yields a `RawSplit`: uint8 images (N, H, W, C), int64 labels and class names.
Tables store each image as its raw HWC bytes (column `image`), the task label (`label`, 0..n-1),
the dataset's own class id (`orig_label`), and the image shape and class names as schema metadata.
Models take raw [0, 1] images: `to_tensors` only scales, never normalises.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import pickle
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import ConfigError, DataConfig

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
CACHE_ROOT = Path(os.environ.get("ROBUST_TRANSFER_DATA", Path.home() / ".cache" / "robust_transfer"))


@dataclass
class RawSplit:
    images: np.ndarray  # uint8, (N, H, W, C)
    labels: np.ndarray  # int64, dataset class ids
    class_names: list[str]


# ----------------------------------------------------------------------------- sources
def load_source(dataset: str, root: Optional[str]) -> dict[str, RawSplit]:
    """{'train': RawSplit, 'test': RawSplit} for a named dataset."""
    loaders = {
        "fashion_mnist": load_fashion_mnist,
        "digits": load_digits,
        "cifar10": load_cifar10,
        "cifar100": load_cifar100,
        "svhn": load_svhn,
        "imagefolder": load_imagefolder,
        "parquet": load_parquet_images,
    }
    if dataset not in loaders:
        raise ConfigError(f"data.dataset: unknown dataset '{dataset}', expected one of {', '.join(loaders)}")
    return loaders[dataset](root)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ConfigError(f"{path} is not an IDX file of unsigned bytes")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ConfigError(f"{path} is truncated: {arr.size} bytes of {int(np.prod(shape))}")
    return arr.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_fashion_mnist(root: Optional[str]) -> dict[str, RawSplit]:
    """IDX files from `root`, Debian's dataset-fashion-mnist, torchvision's layout, or a download."""
    candidates = [Path(root)] if root else [Path(FASHION_DEBIAN_ROOT), CACHE_ROOT / "FashionMNIST" / "raw"]
    if root:
        candidates.append(Path(root) / "FashionMNIST" / "raw")
    for folder in candidates:
        files = {s: _find_idx(folder, f"{s}-idx{3 if 'images' in s else 1}-ubyte")
                 for s in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
        if all(files.values()):
            break
    else:
        folder = _download_fashion_mnist(root)
        files = {s: _find_idx(folder, f"{s}-idx{3 if 'images' in s else 1}-ubyte")
                 for s in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(files[f"{prefix}-images"])[..., None]
        labels = _read_idx(files[f"{prefix}-labels"]).astype(np.int64)
        if len(images) != len(labels):
            raise ConfigError(f"{files[prefix + '-images']}: {len(images)} images but {len(labels)} labels")
        out[split] = RawSplit(images, labels, list(FASHION_CLASSES))
    return out


def _download_fashion_mnist(root: Optional[str]) -> Path:
    target = Path(root) if root else CACHE_ROOT
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(target), train=True, download=True)
        FashionMNIST(str(target), train=False, download=True)
    except Exception as exc:  # no network, or the mirror is down
        raise ConfigError(
            f"Fashion-MNIST not found under {root or FASHION_DEBIAN_ROOT} and the download failed "
            f"({type(exc).__name__}): install it with `apt-get install -y dataset-fashion-mnist`, "
            f"or allow network access so torchvision can download it"
        ) from None
    return target / "FashionMNIST" / "raw"


def load_digits(root: Optional[str] = None) -> dict[str, RawSplit]:
    """scikit-learn's 8x8 digits (1797 images), split 70/30 with a fixed seed."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = np.clip(d.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)[..., None]
    labels = d.target.astype(np.int64)
    order = np.random.default_rng(1234).permutation(len(labels))
    cut = int(0.7 * len(order))
    names = [str(i) for i in range(10)]
    return {"train": RawSplit(images[order[:cut]], labels[order[:cut]], names),
            "test": RawSplit(images[order[cut:]], labels[order[cut:]], names)}


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"missing data file {path}")
    with open(path, "rb") as f:
        # CIFAR's own on-disk format is a Python pickle of plain lists/arrays (as torchvision reads it).
        return pickle.load(f, encoding="latin1")


def _cifar_images(flat) -> np.ndarray:
    return np.asarray(flat, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def _cifar_root(root: Optional[str], folder: str, dataset: str) -> Path:
    for base in ([Path(root)] if root else []) + [CACHE_ROOT]:
        if (base / folder).is_dir():
            return base / folder
        if base.name == folder and base.is_dir():
            return base
    try:
        from torchvision.datasets import CIFAR10, CIFAR100

        cls = CIFAR10 if dataset == "cifar10" else CIFAR100
        base = Path(root) if root else CACHE_ROOT
        cls(str(base), train=True, download=True)
        return base / folder
    except Exception as exc:
        raise ConfigError(f"{dataset} not found under {root or CACHE_ROOT}/{folder} and the download failed "
                          f"({type(exc).__name__}); set data.root to a folder holding {folder}/") from None


def load_cifar10(root: Optional[str]) -> dict[str, RawSplit]:
    folder = _cifar_root(root, "cifar-10-batches-py", "cifar10")
    names = _unpickle(folder / "batches.meta")["label_names"]
    out = {}
    for split, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        batches = [_unpickle(folder / f) for f in files]
        out[split] = RawSplit(np.concatenate([_cifar_images(b["data"]) for b in batches]),
                              np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in batches]),
                              list(names))
    return out


def load_cifar100(root: Optional[str]) -> dict[str, RawSplit]:
    folder = _cifar_root(root, "cifar-100-python", "cifar100")
    names = _unpickle(folder / "meta")["fine_label_names"]
    out = {}
    for split in ("train", "test"):
        b = _unpickle(folder / split)
        out[split] = RawSplit(_cifar_images(b["data"]), np.asarray(b["fine_labels"], dtype=np.int64), list(names))
    return out


def load_svhn(root: Optional[str]) -> dict[str, RawSplit]:
    """SVHN's cropped-digit .mat files (train_32x32.mat, test_32x32.mat); label 10 means digit 0."""
    from scipy.io import loadmat

    base = Path(root) if root else CACHE_ROOT / "svhn"
    out = {}
    for split in ("train", "test"):
        path = base / f"{split}_32x32.mat"
        if not path.is_file():
            try:
                from torchvision.datasets import SVHN

                SVHN(str(base), split=split, download=True)
            except Exception as exc:
                raise ConfigError(f"missing data file {path} and the download failed ({type(exc).__name__}); "
                                  f"set data.root to the folder holding {split}_32x32.mat") from None
        mat = loadmat(str(path))
        images = np.ascontiguousarray(mat["X"].transpose(3, 0, 1, 2)).astype(np.uint8)
        labels = mat["y"].reshape(-1).astype(np.int64) % 10
        out[split] = RawSplit(images, labels, [str(i) for i in range(10)])
    return out


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _decode(blob: bytes, where: str) -> np.ndarray:
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(blob))
        img = img.convert("L" if img.mode in ("L", "1", "I", "I;16") else "RGB")
    except Exception:
        raise ConfigError(f"{where} is not a readable image") from None
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _stack(images: list[np.ndarray], where: str, like: Optional[tuple] = None) -> np.ndarray:
    """One array of same-shaped images (and of the shape `like`, the batches before them)."""
    shapes = {im.shape for im in images} | ({like} if like else set())
    if len(shapes) != 1:
        raise ConfigError(f"{where}: images differ in shape {sorted(shapes)[:3]}; resize them to one shape first")
    return np.stack(images)


def load_imagefolder(root: Optional[str]) -> dict[str, RawSplit]:
    """`root/train/<class>/*.png` and `root/test/<class>/*.png` (class names sorted, as torchvision does)."""
    if not root:
        raise ConfigError("data.root must name the ImageFolder directory for dataset 'imagefolder'")
    base = Path(root)
    if not (base / "train").is_dir() or not (base / "test").is_dir():
        raise ConfigError(f"data.root {base} must hold train/<class>/ and test/<class>/ folders")
    # Hidden entries are not data: macOS's AppleDouble "._x.png" files, ".ipynb_checkpoints" folders.
    classes = sorted(p.name for p in (base / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    out = {}
    for split in ("train", "test"):
        images, labels = [], []
        for idx, name in enumerate(classes):
            for f in sorted((base / split / name).glob("*")):
                if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                    images.append(_decode(f.read_bytes(), str(f)))
                    labels.append(idx)
        if not images:
            raise ConfigError(f"no images found under {base / split}")
        out[split] = RawSplit(_stack(images, str(base / split)), np.asarray(labels, dtype=np.int64), classes)
    return out


def load_parquet_images(root: Optional[str]) -> dict[str, RawSplit]:
    """A user's Parquet table: `image` (encoded PNG/JPEG bytes), `label` (int), and `split`
    ('train'/'test'); or two files `train.parquet` and `test.parquet` in the folder `root`.
    Only the labels (and split) are read here; the images stay in the file until prepare writes the
    ones its tables take (ParquetImages), so a dataset larger than memory passes through."""
    if not root:
        raise ConfigError("data.root must name the Parquet file or folder for dataset 'parquet'")
    base = Path(root)
    files, rows = {}, {}
    if base.is_dir():
        for split in ("train", "test"):
            files[split] = base / f"{split}.parquet"
            rows[split] = None  # every row
    else:
        schema = _read_parquet(base, pq.read_schema)
        if "split" not in schema.names:
            raise ConfigError(f"{base} has no 'split' column; add one ('train'/'test') or give a folder "
                              f"with train.parquet and test.parquet")
        splits = _read_parquet(base, lambda p: pq.read_table(p, columns=["split"])).column(0).to_numpy()
        for split in ("train", "test"):
            files[split], rows[split] = base, np.flatnonzero(splits == split)
    out, labels_of = {}, {}  # (one file with a split column: its labels read once for both splits)
    for split, path in files.items():
        schema = _read_parquet(path, pq.read_schema)
        for col in ("image", "label"):
            if col not in schema.names:
                raise ConfigError(f"{root}: the {split} table has no '{col}' column")
        if path not in labels_of:
            labels_of[path] = _read_parquet(path, lambda p: pq.read_table(p, columns=["label"])).column(0) \
                .to_numpy().astype(np.int64)
        labels = labels_of[path]
        picked = np.arange(len(labels)) if rows[split] is None else rows[split]
        labels = labels[picked]
        if not len(labels):
            raise ConfigError(f"{root}: the {split} table is empty")
        meta = schema.metadata or {}
        names = json.loads(meta[b"class_names"]) if b"class_names" in meta else \
            [str(i) for i in range(int(labels.max()) + 1)]
        out[split] = RawSplit(ParquetImages(path, picked, str(root)), labels, names)
    return out


class ParquetImages:
    """The encoded images of a Parquet file at the row positions `rows` (ascending), decoded only when
    read, a record batch at a time: `batches()` streams them, `np.asarray` reads them all, indexing
    selects rows without reading any. The prepare stage writes its tables from these batches."""

    def __init__(self, path: Path, rows: np.ndarray, where: str, shape: Optional[tuple] = None):
        self.path, self.rows, self.where, self._shape = path, np.asarray(rows, dtype=np.int64), where, shape

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx) -> "ParquetImages":
        rows = self.rows[idx]
        if np.any(np.diff(rows) < 0):
            raise ValueError("ParquetImages keeps its rows in file order: index it with ascending positions")
        return ParquetImages(self.path, rows, self.where, self._shape)

    @property
    def shape(self) -> tuple:
        if self._shape is None:
            first = next(self[:1].batches(), None)
            self._shape = tuple(first.shape[1:]) if first is not None else ()
        return (len(self.rows), *self._shape)

    def batches(self, size: int = 2048) -> Iterator[np.ndarray]:
        if not len(self.rows):
            return
        pf = _read_parquet(self.path, streaming_file)
        start = 0
        for batch in pf.iter_batches(batch_size=size, columns=["image"], use_threads=False):
            lo, hi = np.searchsorted(self.rows, [start, start + len(batch)])
            if hi > lo:
                col = batch.column(0)
                images = _stack([_decode(col[int(r - start)].as_py(), f"{self.where} row {r}") for r in self.rows[lo:hi]],
                                self.where, like=self._shape)
                self._shape = tuple(images.shape[1:])
                yield images
            start += len(batch)
            if start > self.rows[-1]:
                break

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        parts = list(self.batches())
        images = np.concatenate(parts) if parts else np.zeros((0, *(self._shape or (1, 1, 1))), np.uint8)
        return images if dtype is None else images.astype(dtype)


def image_batches(images, size: int = 2048) -> Iterator[np.ndarray]:
    """An image array, or ParquetImages, in batches of `size` images (the last one smaller)."""
    if not isinstance(images, ParquetImages):
        for i in range(0, len(images), size):
            yield images[i:i + size]
        return
    pending, count = [], 0  # what the file's batches selected, regrouped: at most about 2 x size images
    for part in images.batches(size):
        pending.append(part)
        count += len(part)
        while count >= size:
            whole = np.concatenate(pending)
            yield whole[:size]
            pending, count = [whole[size:]], count - size
    if count:
        yield np.concatenate(pending)


def give_back_freed_buffers() -> None:
    """On glibc, serve buffers of 128 KiB and more from mmap, so that freeing one returns it to the OS.
    glibc raises that threshold as a process frees large buffers, after which a streaming loop's
    batch-sized buffers come from a heap that only grows: the extract stage's peak RSS rose by 35 MiB
    at 4x the rows, with no table held; with this it stays flat (benchmarks/memory.py). A no-op elsewhere."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def streaming_file(path: Path) -> pq.ParquetFile:
    """A Parquet file to read in record batches holding only a few pages at a time: with the default
    buffer_size 0, pyarrow reads a row group's whole column chunk first, and a user's table is often
    one row group (then streaming it held it all). One thread: no row group is read ahead."""
    return pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)


def _read_parquet(path: Path, read=pq.read_table):
    """`read(path)` (the whole table, or a `pq.ParquetFile` to stream), a missing or unreadable file one line."""
    if not path.is_file():
        raise ConfigError(f"missing data file {path}")
    try:
        return read(path)
    except Exception as exc:
        raise ConfigError(f"{path} is not a readable Parquet table ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:120]})") from None


def _image_meta(path: Path, schema: pa.Schema) -> tuple[list[int], list[str]]:
    """An image table's (shape, class names), from the metadata the prepare stage writes."""
    meta = schema.metadata or {}
    if b"shape" not in meta or "image" not in schema.names:
        raise ConfigError(f"{path} is not an image table written by the prepare stage")
    return json.loads(meta[b"shape"]), json.loads(meta[b"class_names"])


# ----------------------------------------------------------------------------- task split
def select_classes(split: RawSplit, classes: list[int], where: str) -> RawSplit:
    known = len(split.class_names)
    bad = [c for c in classes if c >= known]
    if bad:
        raise ConfigError(f"{where}: class ids {bad} do not exist (the dataset has {known} classes)")
    mask = np.isin(split.labels, classes)
    remap = {c: i for i, c in enumerate(classes)}
    return RawSplit(split.images[mask], split.labels[mask], [split.class_names[c] for c in classes]), \
        np.vectorize(remap.get, otypes=[np.int64])(split.labels[mask]) if mask.any() else np.zeros(0, np.int64)


def stratified_take(labels: np.ndarray, per_class: Optional[int], total: Optional[int],
                    rng: np.random.Generator, where: str) -> np.ndarray:
    """Indices: `per_class` of each class, or `total` spread evenly over classes; sorted."""
    classes = np.unique(labels)
    if per_class is None and total is None:
        return np.arange(len(labels))
    if per_class is None:
        per_class = -(-total // len(classes))
    picks = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class and total is None:
            raise ConfigError(f"{where}={per_class} is larger than the {len(idx)} images available for class {c}")
        picks.append(rng.permutation(idx)[:per_class])
    out = np.concatenate(picks)
    if total is not None:
        out = rng.permutation(out)[:total]
    return np.sort(out)


def resize_to(images: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Resize (bilinear) and convert channels so a target dataset matches the source's image shape."""
    import torch
    import torch.nn.functional as F

    h, w, c = shape
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    if x.shape[1] != c:
        x = x.mean(1, keepdim=True) if c == 1 else x.expand(-1, c, -1, -1) if x.shape[1] == 1 else x[:, :c]
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def make_task_split(cfg: DataConfig) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]]:
    """{table name: (images, task labels, dataset labels, class names)} for the six tables; a Parquet
    dataset's images are ParquetImages, read when the tables are written (write_image_table)."""
    rng = np.random.default_rng(cfg.seed)
    src = load_source(cfg.dataset, cfg.root)
    tgt = src if cfg.target_dataset in (None, cfg.dataset) else load_source(cfg.target_dataset, cfg.target_root)
    out = {}
    for name, split, classes, key, cap, per_class in (
        ("source_train", src["train"], cfg.source_classes, "data.source_classes", cfg.source_train_size, None),
        ("source_test", src["test"], cfg.source_classes, "data.source_classes", cfg.source_test_size, None),
        ("target_train", tgt["train"], cfg.target_classes, "data.target_classes", None, cfg.shots),
        ("target_test", tgt["test"], cfg.target_classes, "data.target_classes", cfg.target_test_size, None),
    ):
        sub, task_labels = select_classes(split, classes, key)
        where = "data.shots" if per_class else f"data.{name}_size"
        idx = stratified_take(task_labels, per_class, cap, rng, where)
        images = sub.images[idx]  # (ParquetImages: still unread)
        if name.startswith("target") and tgt is not src:  # target tables are few-shot or capped: in memory
            images = resize_to(np.asarray(images), src["train"].images.shape[1:])
        out[name] = (images, task_labels[idx], sub.labels[idx], sub.class_names)
    # The validation split for tune: val_shots per class carved out of the target shots, never the test set.
    images, labels, orig, names = out["target_train"]
    val_idx = stratified_take(labels, cfg.val_shots, None, rng, "data.val_shots") if cfg.val_shots else np.array([], int)
    fit_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    out["target_val"] = (images[val_idx], labels[val_idx], orig[val_idx], names)
    out["target_fit"] = (images[fit_idx], labels[fit_idx], orig[fit_idx], names)
    return out


# ----------------------------------------------------------------------------- tables
def to_table(images: np.ndarray, labels: np.ndarray, orig_labels: np.ndarray, class_names: list[str]) -> pa.Table:
    n = len(images)
    flat = np.ascontiguousarray(images).reshape(n, -1)
    width = flat.shape[1] if n else int(np.prod(images.shape[1:]))
    image_col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(flat.tobytes())])
    meta = {"shape": json.dumps(list(images.shape[1:])), "class_names": json.dumps(class_names)}
    return pa.table({"image": image_col, "label": pa.array(labels, pa.int64()),
                     "orig_label": pa.array(orig_labels, pa.int64())}).replace_schema_metadata(meta)


def atomic_path(path: Path) -> Path:
    """A temporary sibling of `path`: write there, then `os.replace` it into place (or use `atomic_write`).

    Temporaries left by a killed process (`.<name>.tmp-<pid>`, pid no longer running) are removed
    here, so the next write of `path` cleans up after a crash; the old `path` itself is never touched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            stale.unlink(missing_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; it replaces `path` only if the block
    completes, and is removed if it fails, so readers see the old file or the whole new one."""
    path = Path(path)
    tmp = atomic_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# Rows per Parquet row group of an image table: readers that stream a table (extract, a Ray Data user)
# hold one row group at a time, so it bounds their memory (28x28: 4 MB; CIFAR's 32x32x3: 12 MB).
IMAGE_ROW_GROUP = 4096


def write_image_table(images, labels: np.ndarray, orig_labels: np.ndarray, class_names: list[str],
                      path: str | Path) -> None:
    """An image table (to_table's columns and metadata) written to `path` a batch at a time, from an
    array or ParquetImages (decoded batch by batch: the table never sits in memory whole). Callers
    write to a temporary path (atomic_write), since a bad image can stop it half-way."""
    give_back_freed_buffers()
    labels, orig_labels = np.asarray(labels), np.asarray(orig_labels)
    writer, done = None, 0
    try:
        for part in image_batches(images, IMAGE_ROW_GROUP):
            table = to_table(part, labels[done:done + len(part)], orig_labels[done:done + len(part)], class_names)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression="zstd")
            writer.write_table(table, row_group_size=IMAGE_ROW_GROUP)
            done += len(part)
        if writer is None:  # no rows: an empty table with the schema
            empty = np.zeros((0, *(images.shape[1:] or (1, 1, 1))), np.uint8)
            pq.write_table(to_table(empty, labels[:0], orig_labels[:0], class_names), path, compression="zstd")
    finally:
        if writer is not None:
            writer.close()


def write_table(table: pa.Table, path: str | Path) -> None:
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_json(obj, path: str | Path) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ImageTable:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray
    class_names: list[str]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def tensors(self):
        """(float images NCHW in [0, 1], int64 labels) as torch tensors."""
        import torch

        x = torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div_(255.0)
        return x.contiguous(), torch.from_numpy(self.labels)


def read_image_table(path: str | Path, columns=("image", "label")) -> ImageTable:
    path = Path(path)
    table = _read_parquet(path)
    shape, names = _image_meta(path, table.schema)
    buf = table.column("image").combine_chunks()
    raw = np.frombuffer(buf.buffers()[1], dtype=np.uint8, count=len(buf) * int(np.prod(shape)),
                        offset=buf.offset * int(np.prod(shape)))
    return ImageTable(raw.reshape([len(buf)] + shape), table.column("label").to_numpy().astype(np.int64), names)


def iter_image_batches(path: str | Path, batch_size: int) -> Iterator[ImageTable]:
    """Stream an image table in record batches, so tables larger than memory pass through."""
    path = Path(path)
    pf = _read_parquet(path, streaming_file)
    shape, names = _image_meta(path, pf.schema_arrow)
    for batch in pf.iter_batches(batch_size=batch_size, columns=["image", "label"], use_threads=False):
        col = batch.column(0)
        size = int(np.prod(shape))
        raw = np.frombuffer(col.buffers()[1], dtype=np.uint8, count=len(col) * size, offset=col.offset * size)
        yield ImageTable(raw.reshape([len(col)] + shape), batch.column(1).to_numpy().astype(np.int64), names)


def verify_card(card_path: str | Path, tables: dict[str, str | Path]) -> dict:
    """Check each table's sha256 against the data card; a mismatch means stale or tampered data."""
    card_path = Path(card_path)
    if not card_path.is_file():
        raise ConfigError(f"missing data card {card_path}; run the prepare stage")
    card = json.loads(card_path.read_text())
    for name, path in tables.items():
        want = card["tables"].get(name, {}).get("sha256")
        if want is None:
            raise ConfigError(f"{card_path} has no entry for table '{name}'")
        if not Path(path).is_file():
            raise ConfigError(f"missing data file {path}")
        got = sha256_file(path)
        if got != want:
            raise ConfigError(f"{path} does not match its data card {card_path} (sha256 {got[:12]} != {want[:12]}); "
                              f"re-run the prepare stage")
    return card
