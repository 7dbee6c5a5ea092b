"""The trainer's view of the store: each rank's Ray Data dataset of its slices of the shards' current
rows, re-executed at every epoch start so that refreshed versions are picked up.

The ranks split the rows, not a stream: each epoch the shards are put in a seeded order
(`epoch_slices`), and `rank_slices` gives every rank a contiguous run of those rows (whole shards,
and a row range of at most two boundary shards), so every rank has at least rows // world rows and
their order is the same in every run of the same seed. Each rank reads its own
dataset inside its worker — no dataset manager or split coordinator actor to start per fit.

Kept free of torch: Ray imports this module in every reader task's worker process, and a torch
import there costs seconds per process on a small machine.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .errors import CorruptShardError
from .log import log
from .store import SoftTargetStore


def rank_slices(shard_rows: list[tuple[str, int]], world: int) -> list[list[dict]]:
    """[rank] → [{shard_id, start, stop}]: rank r trains on rows [N·r/world, N·(r+1)/world) of the
    shards in manifest order (N rows in all)."""
    total = sum(n for _, n in shard_rows)
    bounds = [total * r // world for r in range(world + 1)]
    slices: list[list[dict]] = [[] for _ in range(world)]
    offset = 0
    for sid, n in shard_rows:
        for r in range(world):
            lo, hi = max(bounds[r], offset), min(bounds[r + 1], offset + n)
            if lo < hi:
                slices[r].append({"shard_id": sid, "start": lo - offset, "stop": hi - offset})
        offset += n
    return slices


def epoch_slices(shard_rows: list[tuple[str, int]], world: int, seed: int, epoch: int) -> list[list[dict]]:
    """`rank_slices` of one epoch: the shards in an order drawn from (seed, epoch), and each slice's
    rows in an order drawn from its own `row_seed`, so a corpus stored in source order (one domain
    or class, then the next) is not trained on in blocks, and a resumed epoch reads the same rows
    in the same order."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(shard_rows))
    slices = rank_slices([shard_rows[i] for i in order], world)
    for items in slices:
        for item in items:
            item["row_seed"] = int(rng.integers(2**63))
    return slices


def load_shards(batch: pa.Table, *, store_uri: str, what: str, schema: pa.Schema) -> pa.Table:
    """Map step: shard ids (and, where given, a start/stop row range of each) → those rows of the
    shard's current version (targets) or of its inputs, permuted by the item's `row_seed` if any."""
    store = SoftTargetStore(store_uri)
    ranges = batch.to_pylist()
    tables = []
    for item in ranges:
        sid = item["shard_id"]
        try:
            table = store.read_shard(sid) if what == "targets" else store.read_input(sid)
        except CorruptShardError as e:
            # Never train on a bad shard: skip it this epoch; the next teacher pass re-issues it.
            log(f"skipping shard {sid}: {e}", warning=True)
            continue
        if item.get("start") is not None:
            table = table.slice(item["start"], item["stop"] - item["start"])
        if item.get("row_seed") is not None:
            table = table.take(np.random.default_rng(item["row_seed"]).permutation(table.num_rows))
        tables.append(table.select(schema.names).cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def store_dataset(store_uri: str, shards: list[str] | list[dict], schema: pa.Schema, what: str = "targets",
                  readers: int = 2):
    """A lazily executed dataset of the shards' current rows (checksums verified on read); `shards`
    are ids (whole shards) or `rank_slices` items."""
    import ray.data

    items = [s if isinstance(s, dict) else {"shard_id": s, "start": None, "stop": None, "row_seed": None} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds.context.enable_progress_bars = False  # re-read every epoch: rank 0's step log is the progress
    # A bounded number of reader tasks: one per shard at once would start a worker process per
    # shard, and memory would grow with the store instead of staying flat.
    return ds.map_batches(load_shards, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
                          compute=ray.data.TaskPoolStrategy(size=max(1, readers)),
                          fn_kwargs={"store_uri": store_uri, "what": what, "schema": schema})
