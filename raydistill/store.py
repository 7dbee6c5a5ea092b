"""The soft-target store: Parquet shard versions plus one JSON manifest, on any pyarrow filesystem.

Layout (local path or remote URI such as s3://bucket/run/targets, gs://...)::

    <store>/
      manifest.json                      # the one source of truth
      inputs/train/<shard_id>.parquet    # a shard's fixed input sequences (written once)
      inputs/eval.parquet                # held-out sequences
      shards/<shard_id>/v<version>.parquet

`manifest.json`::

    {"format_version": 1,
     "tokenizer": {"name", "vocab_size", "hash"},          # what every shard was tokenized with
     "targets":   {"format", <params>},                    # e.g. {"format": "topk", "k": 20, ...}
     "inputs":    {"shards": {shard_id: {"input": rel, "rows": n}}, "eval": rel, "info": {...}},
     "shards":    {shard_id: {"current": int | null,
                              "versions": {"<v>": {rows, bytes, checksum, teacher_rev, format,
                                                   params, produced_at_step, policy_version,
                                                   version, path, created[, invalid]}}}},
     "state":     {...},                                    # free-form, owned by the scheduler
     "created": iso-time, "updated": iso-time}

Paths inside the manifest are relative to the store root, so a store can be copied or moved.

Readers resolve a shard's *current* version through the manifest, never by listing directories:
superseded versions stay on disk until `gc` so that an epoch already reading them can finish.

Writes are atomic: a file is written under a temporary name beside its target
(`.tmp-<uuid>-<name>`), fsync'ed on local disks, then renamed. A new shard version is invisible
until `commit` replaces the manifest (also temp + rename; a single PUT on object stores, where a
PUT is atomic and a rename is a copy). A crash at any point leaves the last committed state
readable; the debris (temp files, uncommitted versions) is removed by `gc`.

Single-writer assumption: one process commits (mutates the manifest) at a time -- the driver
before training, the `RefreshScheduler` actor during it. Shard *files* may be written by any
process (teacher actors) through `write_shard`, which never touches the manifest. Within one
process, manifest read-modify-writes are serialized by a lock.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import threading
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raydistill.errors import CorruptShardError, StoreError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RECORD_KEYS = ("rows", "checksum", "bytes", "teacher_rev", "format", "params",
               "produced_at_step", "policy_version")
_SHARD_ID = re.compile(r"^[A-Za-z0-9._-]+$")
_VERSION_FILE = re.compile(r"^v(\d+)\.parquet$")
# Object stores: a PUT is atomic, a "rename" is copy + delete, so the manifest is PUT directly.
_OBJECT_STORES = {"s3", "gcs", "abfs"}

# One lock per manifest path (not per object), so two store objects in one process serialize too.
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _fault(point: str) -> None:
    """Crash-test hook (RAYDISTILL_FAULT, see raydistill/faults.py)."""
    from raydistill.faults import store_crash

    store_crash(point)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _sha256(buf) -> str:
    return "sha256:" + hashlib.sha256(memoryview(buf)).hexdigest()


def _fsync_dir(path: str) -> None:
    # The rename is only durable once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def target_params(targets: dict) -> tuple[str, dict]:
    """Split a targets dict {"format", **params} into (format, params) as stored in records."""
    return targets["format"], {k: v for k, v in targets.items() if k != "format"}


def _describe(d: dict) -> str:
    return json.dumps(d, sort_keys=True)


class SoftTargetStore:
    """A handle on one store; cheap to create, holds no cached state (the manifest is re-read)."""

    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None):
        uri = str(uri)
        self._explicit_fs = filesystem
        if filesystem is not None:
            # The uri is a path inside the given filesystem; a scheme, if any, is dropped.
            self.uri = uri
            self.filesystem = filesystem
            self._root = uri.split("://", 1)[1] if "://" in uri else uri
        elif "://" in uri:
            self.uri = uri
            self.filesystem, self._root = pafs.FileSystem.from_uri(uri)
        else:
            # Absolute, because Ray workers run in another working directory.
            self.uri = os.path.abspath(uri)
            self.filesystem, self._root = pafs.LocalFileSystem(), self.uri
        self._root = self._root.rstrip("/") or "/"
        self._local = isinstance(self.filesystem, pafs.LocalFileSystem)
        self._made_dirs: set[str] = set()
        key = f"{self.filesystem.type_name}:{self.full_path(MANIFEST)}"
        with _LOCKS_GUARD:
            self._lock = _LOCKS.setdefault(key, threading.Lock())

    def __reduce__(self):
        # Ships to Ray tasks/actors; a filesystem derived from the uri is re-derived there.
        return (type(self), (self.uri, self._explicit_fs))

    def __repr__(self):
        return f"SoftTargetStore({self.uri!r})"

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, uri, *, tokenizer: dict, targets: dict, create: bool = True,
             filesystem: pafs.FileSystem | None = None) -> "SoftTargetStore":
        """Open (or create) a store for a run; refuse one built for another tokenizer or format."""
        store = cls(uri, filesystem=filesystem)
        m = store._read_manifest(missing_ok=True)
        if m is None:
            if not create:
                raise StoreError(f"no soft-target store at {store.uri} (no {MANIFEST}) — "
                                 "run the teacher pass first, or point targets.store at an existing store")
            now = _now()
            store._write_manifest({
                "format_version": FORMAT_VERSION, "tokenizer": dict(tokenizer),
                "targets": dict(targets),
                "inputs": {"shards": {}, "eval": None, "info": {}},
                "shards": {}, "state": {}, "created": now, "updated": now})
            return store
        # JSON round trip so tuples/ints compare like what is stored.
        tokenizer = json.loads(json.dumps(tokenizer))
        targets = json.loads(json.dumps(targets))
        have_tok = m["tokenizer"]
        fix = f"use another targets.store, or delete {store.uri} to rebuild"
        if (have_tok.get("vocab_size") != tokenizer.get("vocab_size")
                or have_tok.get("hash") != tokenizer.get("hash")):
            raise StoreError(
                f"soft-target store {store.uri} holds targets for tokenizer {_describe(have_tok)}, "
                f"but this run asks for tokenizer {_describe(tokenizer)} — {fix}")
        if m["targets"] != targets:
            raise StoreError(
                f"soft-target store {store.uri} holds targets {_describe(m['targets'])}, "
                f"but this run asks for targets {_describe(targets)} — {fix}")
        return store

    # ------------------------------------------------------------------ paths and files
    def full_path(self, rel: str) -> str:
        """Path of `rel` (relative to the store root) usable with `self.filesystem`."""
        return f"{self._root}/{rel}" if self._root != "/" else f"/{rel}"

    def _ensure_dir(self, path: str) -> None:
        parent = path.rsplit("/", 1)[0]
        if parent and parent not in self._made_dirs:
            self.filesystem.create_dir(parent, recursive=True)
            self._made_dirs.add(parent)

    def _put_atomic(self, path: str, data, *, temp: bool = True, kind: str = "file") -> None:
        """Write bytes to `path` so that readers see the old content or all of the new one."""
        self._ensure_dir(path)
        if not temp:
            with self.filesystem.open_output_stream(path) as out:
                out.write(data)
            return
        parent, name = path.rsplit("/", 1)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
        if self._local:
            with open(tmp, "wb") as f:
                f.write(memoryview(data))
                f.flush()
                os.fsync(f.fileno())
        else:
            with self.filesystem.open_output_stream(tmp) as out:
                out.write(data)
        _fault("after_temp_write" if kind == "file" else "after_manifest_temp")
        self.filesystem.move(tmp, path)
        if self._local:
            _fsync_dir(parent)

    def write_file(self, rel_path: str, table: pa.Table) -> dict:
        """Atomically write `table` as Parquet at `rel_path`; returns {path, rows, bytes, checksum}.

        Safe from any process; does not touch the manifest.
        """
        sink = pa.BufferOutputStream()
        # No dictionary: ids and log-probs are high-cardinality, dictionary pages only cost space.
        pq.write_table(table, sink, compression="zstd", use_dictionary=False, write_statistics=True)
        data = sink.getvalue()
        self._put_atomic(self.full_path(rel_path), data)
        _fault("after_rename")
        return {"path": rel_path, "rows": table.num_rows, "bytes": data.size,
                "checksum": _sha256(data)}

    @staticmethod
    def shard_path(shard_id: str, version: int) -> str:
        return f"shards/{shard_id}/v{int(version)}.parquet"

    def write_shard(self, shard_id: str, version: int, table: pa.Table) -> dict:
        if not _SHARD_ID.match(str(shard_id)):
            raise StoreError(f"invalid shard id {shard_id!r}: use letters, digits, '.', '_' or '-'")
        return self.write_file(self.shard_path(shard_id, version), table)

    # ------------------------------------------------------------------ the manifest
    def _read_manifest(self, missing_ok: bool = False) -> dict | None:
        path = self.full_path(MANIFEST)
        try:
            with self.filesystem.open_input_file(path) as f:
                raw = f.read_buffer()
        except FileNotFoundError:
            if missing_ok:
                return None
            raise StoreError(f"no soft-target store at {self.uri} (no {MANIFEST}) — "
                             "create it with SoftTargetStore.open(uri, tokenizer=..., targets=...)") from None
        try:
            m = json.loads(bytes(raw))
        except ValueError as e:
            raise StoreError(f"{path} is not valid JSON ({e}) — delete {self.uri} to rebuild the store") from None
        if m.get("format_version", 0) > FORMAT_VERSION:
            raise StoreError(f"{path} has format_version {m.get('format_version')}, newer than this "
                             f"raydistill understands ({FORMAT_VERSION}) — upgrade raydistill")
        return m

    def _write_manifest(self, m: dict) -> None:
        data = json.dumps(m, indent=1, sort_keys=True).encode()
        temp = self.filesystem.type_name not in _OBJECT_STORES
        self._put_atomic(self.full_path(MANIFEST), data, temp=temp, kind="manifest")
        _fault("after_manifest")

    def _update(self, fn):
        """Read-modify-write of the manifest under the process lock; returns fn's result."""
        with self._lock:
            m = self._read_manifest()
            out = fn(m)
            m["updated"] = _now()
            self._write_manifest(m)
            return out

    def manifest(self) -> dict:
        """A fresh read of manifest.json (sees commits made by other processes)."""
        return self._read_manifest()

    # ------------------------------------------------------------------ inputs
    def record_inputs(self, shards: dict[str, dict], eval_path: str | None, info: dict) -> None:
        """Register the input shards ({id: {"input": rel, "rows": n, ...}}), eval file and info."""
        for sid, rec in shards.items():
            if not _SHARD_ID.match(str(sid)):
                raise StoreError(f"invalid shard id {sid!r}: use letters, digits, '.', '_' or '-'")
            assert "input" in rec and "rows" in rec, rec

        def fn(m):
            m["inputs"] = {"shards": {k: dict(v) for k, v in shards.items()},
                           "eval": eval_path, "info": dict(info)}
        self._update(fn)

    def has_inputs(self) -> bool:
        return bool(self.manifest()["inputs"].get("shards"))

    def shard_ids(self) -> list[str]:
        """Every shard with recorded inputs or committed versions, sorted."""
        m = self.manifest()
        return sorted(set(m["inputs"].get("shards") or {}) | set(m["shards"]))

    def input_path(self, shard_id: str) -> str:
        shards = self.manifest()["inputs"].get("shards") or {}
        if shard_id not in shards:
            raise StoreError(f"store {self.uri} has no inputs for shard {shard_id!r} — "
                             "run the data phase (record_inputs) first")
        return self.full_path(shards[shard_id]["input"])

    def eval_path(self) -> str:
        rel = self.manifest()["inputs"].get("eval")
        if not rel:
            raise StoreError(f"store {self.uri} has no eval inputs — run the data phase first")
        return self.full_path(rel)

    def read_input(self, shard_id: str) -> pa.Table:
        return pq.read_table(self.input_path(shard_id), filesystem=self.filesystem)

    # ------------------------------------------------------------------ versions
    @staticmethod
    def _current(m: dict, shard_id: str) -> dict | None:
        entry = m["shards"].get(shard_id)
        if not entry or entry.get("current") is None:
            return None
        return dict(entry["versions"][str(entry["current"])])

    def current(self, shard_id: str) -> dict | None:
        """The current version's record (with "version" and relative "path"), or None."""
        return self._current(self.manifest(), shard_id)

    def next_version(self, shard_id: str) -> int:
        entry = self.manifest()["shards"].get(shard_id)
        return 1 + max((int(v) for v in entry["versions"]), default=0) if entry else 1

    def commit(self, shard_id: str, version: int, record: dict) -> None:
        """Make a written version current. One committing process at a time (see module doc)."""
        missing = [k for k in RECORD_KEYS if k not in record]
        if missing:
            raise StoreError(f"commit of shard {shard_id} v{version}: record lacks {missing}")
        version = int(version)
        rel = self.shard_path(shard_id, version)
        # Catches a store on node-local disk of a multi-node cluster: the file is elsewhere.
        info = self.filesystem.get_file_info(self.full_path(rel))
        if info.type != pafs.FileType.File or info.size != record["bytes"]:
            raise StoreError(
                f"commit of shard {shard_id} v{version}: {self.full_path(rel)} "
                f"{'is missing' if info.type != pafs.FileType.File else f'has {info.size} bytes'}, "
                f"expected {record['bytes']} bytes — on a multi-node cluster targets.store must be "
                "shared storage (s3://, gs://, NFS)")
        rec = json.loads(json.dumps(dict(record)))
        rec.update(version=version, path=rel, created=_now())
        rec.pop("invalid", None)

        def fn(m):
            entry = m["shards"].setdefault(shard_id, {"current": None, "versions": {}})
            if entry["current"] is not None and version < entry["current"]:
                raise StoreError(f"commit of shard {shard_id} v{version} would go back from current "
                                 f"v{entry['current']} — a stale pass; re-run it with next_version()")
            entry["versions"][str(version)] = rec
            entry["current"] = version
        self._update(fn)

    def invalidate(self, shard_id: str, reason: str) -> None:
        """Mark the current version bad: no current version, so the next pass re-scores the shard."""
        def fn(m):
            entry = m["shards"].get(shard_id)
            if entry and entry["current"] is not None:
                entry["versions"][str(entry["current"])]["invalid"] = str(reason)
                entry["current"] = None
        self._update(fn)

    # ------------------------------------------------------------------ reading and checking
    def _load(self, shard_id: str, rec: dict, *, verify: bool, parse: bool) -> pa.Table | None:
        path = self.full_path(rec["path"])

        def corrupt(what, expected, found):
            e = CorruptShardError(
                f"shard {shard_id} v{rec['version']} at {path}: {what} (expected {expected}, "
                f"found {found}) — invalidate it (store.invalidate) so the next teacher pass rewrites it")
            e.shard_id, e.version, e.path = shard_id, rec["version"], path
            return e

        try:
            with self.filesystem.open_input_file(path) as f:
                data = f.read_buffer()  # read once: the checksum and the parse see the same bytes
        except FileNotFoundError:
            raise corrupt("file missing", f"{rec['bytes']} bytes", "no file") from None
        if verify and _sha256(data) != rec["checksum"]:
            raise corrupt("checksum mismatch", rec["checksum"], _sha256(data))
        try:
            if parse:
                table = pq.read_table(pa.BufferReader(data))
                rows = table.num_rows
            else:
                table, rows = None, pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
        except (pa.ArrowException, OSError) as e:
            raise corrupt("unparsable Parquet", "a Parquet file", str(e).splitlines()[0]) from None
        if verify and rows != rec["rows"]:
            raise corrupt("row count mismatch", f"{rec['rows']} rows", f"{rows} rows")
        return table

    def read_shard(self, shard_id: str, *, verify: bool = True) -> pa.Table:
        """The current version of a shard, its checksum and row count checked against the record."""
        rec = self.current(shard_id)
        if rec is None:
            raise StoreError(f"shard {shard_id} of store {self.uri} has no current version — "
                             "run a teacher pass over it first")
        return self._load(shard_id, rec, verify=verify, parse=True)

    def verify(self, shard_id: str) -> str | None:
        """None if the current version (if any) is intact, else the reason."""
        rec = self.current(shard_id)
        if rec is None:
            return None
        try:
            self._load(shard_id, rec, verify=True, parse=False)
        except CorruptShardError as e:
            return str(e)
        return None

    def verify_all(self) -> dict[str, str]:
        """{shard_id: reason} for every shard whose current version is damaged."""
        m = self.manifest()
        bad = {}
        for sid in sorted(m["shards"]):
            rec = self._current(m, sid)
            if rec is not None:
                try:
                    self._load(sid, rec, verify=True, parse=False)
                except CorruptShardError as e:
                    bad[sid] = str(e)
        return bad

    # ------------------------------------------------------------------ staleness
    def pending(self, teacher_rev: str, targets: dict) -> list[str]:
        """Shards a pass for (teacher_rev, targets) must score: no current version, or another
        teacher revision / format / params. What makes a pass resumable."""
        fmt, params = target_params(json.loads(json.dumps(targets)))
        m = self.manifest()
        out = []
        for sid in sorted(set(m["inputs"].get("shards") or {}) | set(m["shards"])):
            rec = self._current(m, sid)
            if (rec is None or rec["teacher_rev"] != teacher_rev or rec["format"] != fmt
                    or rec["params"] != params):
                out.append(sid)
        return out

    def ages(self, step: int) -> dict[str, int]:
        """{shard_id: step - produced_at_step} for shards with a current version."""
        m = self.manifest()
        return {sid: step - rec["produced_at_step"] for sid in sorted(m["shards"])
                if (rec := self._current(m, sid)) is not None}

    # ------------------------------------------------------------------ garbage collection
    def gc(self, keep: int = 2, *, tmp_grace_s: float = 3600.0) -> int:
        """Delete version files beyond the newest `keep` per shard (never the current one),
        uncommitted versions older than the newest recorded one, and `.tmp-*` files older than
        `tmp_grace_s` (younger ones may be writes in flight). Returns the number of files deleted.
        """
        assert keep >= 1, "keep >= 1: next_version() counts from the newest recorded version"
        doomed: list[str] = []

        def fn(m):
            for sid, entry in m["shards"].items():
                versions = sorted((int(v) for v in entry["versions"]), reverse=True)
                for v in versions[keep:]:
                    if v != entry["current"]:
                        doomed.append(self.full_path(entry["versions"].pop(str(v))["path"]))
            return m
        # Manifest first: a crash before the deletes leaves only orphans, which the next gc finds.
        m = self._update(fn)
        now = _dt.datetime.now(_dt.timezone.utc)
        listing = self.filesystem.get_file_info(
            pafs.FileSelector(self._root, recursive=True, allow_not_found=True))
        for info in listing:
            if info.type != pafs.FileType.File:
                continue
            parts = info.path.rstrip("/").split("/")
            name = parts[-1]
            if name.startswith(".tmp-"):
                mtime = info.mtime
                age = (now - mtime.astimezone(_dt.timezone.utc)).total_seconds() if mtime else None
                if tmp_grace_s <= 0 or (age is not None and age >= tmp_grace_s):
                    doomed.append(info.path)
            elif len(parts) >= 3 and parts[-3] == "shards" and (mv := _VERSION_FILE.match(name)):
                entry = m["shards"].get(parts[-2])
                # A version above every recorded one may be a write in flight: leave it.
                if entry and str(int(mv.group(1))) not in entry["versions"] and \
                        int(mv.group(1)) < max(map(int, entry["versions"]), default=0):
                    doomed.append(info.path)
        deleted = 0
        for path in dict.fromkeys(doomed):
            try:
                self.filesystem.delete_file(path)
                deleted += 1
            except FileNotFoundError:
                pass
        return deleted

    # ------------------------------------------------------------------ state and summary
    def update_state(self, key: str, value) -> None:
        """Store a small JSON value (the scheduler's state) in the manifest."""
        value = json.loads(json.dumps(value))

        def fn(m):
            m.setdefault("state", {})[key] = value
        self._update(fn)

    def state(self, key: str, default=None):
        return self.manifest().get("state", {}).get(key, default)

    def summary(self) -> dict:
        """Totals over current versions: shards, rows, bytes, tokens (if seq_len known), versions."""
        m = self.manifest()
        cur = {sid: self._current(m, sid) for sid in sorted(set(m["inputs"].get("shards") or {})
                                                            | set(m["shards"]))}
        live = {sid: r for sid, r in cur.items() if r is not None}
        rows = sum(r["rows"] for r in live.values())
        nbytes = sum(r["bytes"] for r in live.values())
        out = {"uri": self.uri, "shards": len(cur), "shards_current": len(live), "rows": rows,
               "bytes": nbytes, "current": {sid: (r["version"] if r else None) for sid, r in cur.items()}}
        seq_len = m["inputs"].get("info", {}).get("seq_len")
        if seq_len:
            out["tokens"] = rows * int(seq_len)
            out["bytes_per_token"] = nbytes / out["tokens"] if out["tokens"] else None
        return out
