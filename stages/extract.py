"""extract: robust features of the target tables from one frozen source model, as Parquet.

outs: data/features/<source>/<table>.parquet (penultimate `z`, and `h<k>` for each k in extract.ks),
each with the source checkpoint's MLflow run id and the data hash in its metadata.
"""
from __future__ import annotations

from pathlib import Path

from robust_transfer import engine, features
from robust_transfer.config import ConfigError, ExtractConfig, RayConfig, load_section, pretrain_entries
from robust_transfer.data import sha256_file, verify_card
from robust_transfer.nets import load_model
from stages._common import run

TABLES = ("target_train", "target_fit", "target_val", "target_test")


def main(args, params) -> None:
    cfg = load_section(ExtractConfig, params, "extract")
    ray_cfg = load_section(RayConfig, params, "ray")
    card = verify_card("data/card.json", {t: f"data/{t}.parquet" for t in TABLES})
    sources = pretrain_entries(params)
    if args.source not in sources:
        raise ConfigError(f"extract: no source '{args.source}' in pretrain.sources ({', '.join(sources)})")
    for source in [args.source]:
        ckpt = Path("models") / f"{source}.pt"
        _, cfg_src, options = sources[source]
        shape = card["tables"]["target_train"]["image_shape"]  # H, W, C
        net, extra = load_model(ckpt, expect_arch=None if "registry" in options else cfg_src.arch,
                                expect={"in_channels": shape[2], "image_size": shape[0]})
        ks = [k for k in cfg.ks if k <= len(net.blocks)]
        meta = {"source": source, "source_run_id": extra.get("run_id"), "source_sha256": sha256_file(ckpt),
                "data_hash": card["data_hash"], "ks": ks}
        for table in TABLES:
            out = Path("data/features") / source / f"{table}.parquet"
            rows = engine.on_device(features.extract, ray_cfg, net, str(Path(f"data/{table}.parquet").resolve()),
                                    str(out.resolve()), ks, meta, cfg.batch_size)
            print(f"extract: {source}/{table}: {rows} rows (z: {net.feature_dim} dims, ks {ks})")


if __name__ == "__main__":
    run(main, lambda p: p.add_argument("source", help="a key of pretrain.sources"))
