"""A fit's data start: Ray Train's `datasets=` (dataset manager + split coordinator, the path before
2026-12-02) vs each rank's own dataset of its `rank_slices` (train.py now), in the same session.

    .venv/bin/python bench/fit_start.py [--pairs 3]

Both arms are the same 1-worker TorchTrainer over the same store (a tiny GPT-2 teacher pass,
built here); its loop imports what the trainer imports, then reads its whole split once. Printed per
fit: wall, the time until the loop starts (controller + worker group), and until its first batch
(the data start). A B A B pairs; the ratios are medians of new / old.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, init_ray, loadavg, median, setup_env  # noqa: E402

setup_env()
sys.path.insert(0, os.path.join(ROOT, "tests"))


def loop(cfg: dict) -> None:
    start = time.time()
    import ray.train
    import transformers  # noqa: F401  (the student build's import)

    from raydistill.shard_reader import store_dataset

    ctx = ray.train.get_context()
    if cfg["arm"] == "datasets":
        batches = ray.train.get_dataset_shard("train").iter_batches(batch_size=8, batch_format="pyarrow")
    else:
        ds = store_dataset(cfg["store"], cfg["slices"][ctx.get_world_rank()], cfg["schema"], "targets", readers=2)
        batches = ds.iter_batches(batch_size=8, batch_format="pyarrow")
    first, n = None, 0
    for _ in batches:
        first = first or time.time()
        n += 1
    with open(cfg["marks"], "w") as f:
        json.dump({"loop_start": start, "first_batch": first, "batches": n}, f)


def build_store(root: str) -> str:
    import tiny
    from raydistill import pipeline
    from raydistill.config import Config
    from raydistill.data import build_inputs

    tok = tiny.make_tokenizer(f"{root}/tok")
    tiny.make_gpt2(f"{root}/teacher", tok, n_layer=2, n_embd=32)
    corpus = tiny.write_corpus(f"{root}/corpus.parquet", tiny.corpus_texts(200))
    cfg = Config.from_dict({"run": {"name": "fit-start", "output_dir": f"{root}/run"},
                            "data": {"path": corpus, "seq_len": 64},
                            "teacher": {"model": f"{root}/teacher", "cpus_per_replica": 0.5},
                            "targets": {"shard_rows": 32}, "student": {"init_from_teacher": {"n_layer": 1}}})
    info = pipeline.preflight(cfg)
    store = pipeline.open_store(cfg, info)
    build_inputs(cfg, store, info)
    pipeline.score_pending(cfg, store, info)
    store.release_lease()
    return store.uri


def fit(arm: str, store_uri: str, root: str, i: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raydistill.shard_reader import rank_slices, store_dataset
    from raydistill.store import SoftTargetStore

    store = SoftTargetStore(store_uri)
    ids = store.shard_ids()
    schema = store.read_shard(ids[0]).schema
    rows = store.manifest()["inputs"]["shards"]
    marks = f"{root}/marks-{arm}-{i}.json"
    cfg = {"arm": arm, "store": store_uri, "schema": schema, "marks": marks,
           "slices": rank_slices([(s, rows[s]["rows"]) for s in ids], 1)}
    extra = {"datasets": {"train": lambda: store_dataset(store_uri, ids, schema, "targets", readers=2)}} \
        if arm == "datasets" else {}
    t0 = time.time()
    TorchTrainer(loop, train_loop_config=cfg, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=f"fit-start-{arm}-{i}-{int(t0)}", storage_path=f"{root}/ckpt"), **extra).fit()
    wall = time.time() - t0
    with open(marks) as f:
        m = json.load(f)
    return {"arm": arm, "wall_s": round(wall, 2), "to_loop_s": round(m["loop_start"] - t0, 2),
            "data_start_s": round(m["first_batch"] - m["loop_start"], 2), "batches": m["batches"],
            "load": loadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3)
    args = p.parse_args()
    init_ray()
    root = tempfile.mkdtemp(prefix="fit-start-")
    store_uri = build_store(root)
    runs = []
    for i in range(args.pairs):
        for arm in ("datasets", "rank_slices"):
            runs.append(fit(arm, store_uri, root, i))
            print("fit", json.dumps(runs[-1]), flush=True)
    for key in ("wall_s", "data_start_s"):
        ratios = [b[key] / a[key] for a, b in zip(runs[0::2], runs[1::2])]
        print(f"{key}: rank_slices / datasets per pair " + ", ".join(f"{r:.2f}" for r in ratios)
              + f"; median {median(ratios):.2f}")
    print("pairs (datasets -> rank_slices): " + "; ".join(
        f"wall {a['wall_s']:.1f} -> {b['wall_s']:.1f} s, data start {a['data_start_s']:.1f} -> {b['data_start_s']:.1f} s"
        for a, b in zip(runs[0::2], runs[1::2])))


if __name__ == "__main__":
    main()
