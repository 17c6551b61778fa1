"""Feature tables: a frozen source model's representations of image tables, as Parquet.

Columns: `label`, `z` (penultimate features) and `h{k}` (input of the last k blocks, flattened),
each a fixed-size list of float32; schema metadata names the source checkpoint, its MLflow run,
the data hash and each column's shape. Images stream through in record batches, so a table larger
than memory passes through.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .config import ConfigError
from .data import atomic_write, give_back_freed_buffers, iter_image_batches


def _fixed_list(arr: np.ndarray) -> pa.Array:
    flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(len(arr), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])


@torch.no_grad()
def extract(net, images_path: str | Path, out_path: str | Path, ks: list[int], meta: dict,
            batch_size: int = 512, device: str = "cpu") -> int:
    """Write `net`'s features of every image in `images_path` to `out_path`; returns the row count."""
    give_back_freed_buffers()  # a batch at a time, in constant memory
    net = net.to(device).eval()
    writer, rows, shapes = None, 0, {}
    with atomic_write(out_path) as tmp:  # a failed or killed extraction leaves the old table in place
        try:
            for part in iter_image_batches(images_path, batch_size):
                x, y = part.tensors()
                x = x.to(device)
                cols = {"label": pa.array(y.numpy(), pa.int64()), "z": None}
                cols["z"] = _fixed_list(net.features(x).cpu().numpy())
                shapes["z"] = [net.feature_dim]
                for k in ks:
                    h = net.trunk(x, k).cpu()
                    shapes[f"h{k}"] = list(h.shape[1:])
                    cols[f"h{k}"] = _fixed_list(h.numpy())
                batch = pa.table(cols)
                if writer is None:
                    schema = batch.schema.with_metadata({**{k: json.dumps(v) for k, v in meta.items()},
                                                         "shapes": json.dumps(shapes)})
                    writer = pq.ParquetWriter(tmp, schema, compression="zstd")
                writer.write_table(batch.cast(writer.schema))
                rows += len(y)
        finally:
            if writer is not None:
                writer.close()
    return rows


def read(path: str | Path, columns: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    """{column: tensor} with each feature column reshaped to its stored shape."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"missing feature table {path}; run the extract stage")
    try:
        table = pq.read_table(path, columns=columns)
    except Exception as exc:
        raise ConfigError(f"{path} is not a readable feature table ({type(exc).__name__})") from None
    shapes = json.loads(table.schema.metadata[b"shapes"])
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if name == "label":
            out["y"] = torch.from_numpy(col.to_numpy().astype(np.int64))
        else:
            values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            out[name] = torch.from_numpy(values.reshape([len(col)] + shapes[name]).copy())
    return out


def metadata(path: str | Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): json.loads(v) for k, v in meta.items()}
