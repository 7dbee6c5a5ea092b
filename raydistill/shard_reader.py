"""The trainer's view of the store: a Ray Data dataset of the shards' current rows, re-read at
every epoch start so that refreshed versions are picked up.

Kept free of torch: Ray imports this module in every reader task's worker process, and a torch
import there costs seconds per process on a small machine.
"""
from __future__ import annotations

import pyarrow as pa

from .errors import CorruptShardError
from .log import log
from .store import SoftTargetStore


def load_shards(batch: pa.Table, *, store_uri: str, what: str, schema: pa.Schema) -> pa.Table:
    """Map step: shard ids → that shard's current rows (targets) or its inputs."""
    store = SoftTargetStore(store_uri)
    tables = []
    for sid in batch.column("shard_id").to_pylist():
        try:
            table = store.read_shard(sid) if what == "targets" else store.read_input(sid)
        except CorruptShardError as e:
            # Never train on a bad shard: skip it this epoch; the next teacher pass re-issues it.
            log(f"skipping shard {sid}: {e}", warning=True)
            continue
        tables.append(table.select(schema.names).cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def store_dataset(store_uri: str, shard_ids: list[str], schema: pa.Schema, what: str = "targets",
                  readers: int = 2):
    """A lazily executed dataset of the shards' current rows (checksums verified on read)."""
    import ray.data

    ds = ray.data.from_items([{"shard_id": s} for s in shard_ids], override_num_blocks=len(shard_ids))
    ds.context.enable_progress_bars = False  # re-read every epoch: rank 0's step log is the progress
    # A bounded number of reader tasks: one per shard at once would start a worker process per
    # shard, and memory would grow with the store instead of staying flat.
    return ds.map_batches(load_shards, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
                          compute=ray.data.TaskPoolStrategy(size=max(1, readers)),
                          fn_kwargs={"store_uri": store_uri, "what": what, "schema": schema})
