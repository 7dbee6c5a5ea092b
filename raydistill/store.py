"""The soft-target store: Parquet shard versions plus one JSON manifest, on any pyarrow filesystem.

Layout (local path or remote URI such as s3://bucket/run/targets, gs://...)::

    <store>/
      manifest.json                      # the one source of truth
      inputs/train/<shard_id>.parquet    # a shard's fixed input sequences (written once)
      inputs/eval.parquet                # held-out sequences
      shards/<shard_id>/v<version>.parquet

`manifest.json`::

    {"format_version": 1,
     "tokenizer": {"name", "vocab_size", "hash", "width"}, # what every shard was tokenized with;
                                    # width: W, the shared head width its target ids stay below
                                    # (models.ModelInfo; absent in stores written before it)
     "targets":   {"format", <params>},                    # e.g. {"format": "topk", "k": 20, ...}
     "inputs":    {"shards": {shard_id: {"input": rel, "rows": n, "checksum", "bytes"}}, "eval": rel,
                   "eval_checksum": str, "info": {...}},         # checksums: verified on every read
     "shards":    {shard_id: {"current": int | null,
                              "versions": {"<v>": {rows, bytes, checksum, teacher_rev, format,
                                                   params, produced_at_step, policy_version,
                                                   version, path, created[, invalid]}}}},
     "state":     {...},                                    # free-form, owned by the scheduler
     "created": iso-time, "updated": iso-time}

`manifest.lock` (a manifest update in progress) and `writer.lease` (the job writing the store)
sit beside it; see "Writers" below.

Paths inside the manifest are relative to the store root, so a store can be copied or moved.

Readers resolve a shard's *current* version through the manifest, never by listing directories:
superseded versions stay on disk until `gc` so that an epoch already reading them can finish.

Writes are atomic: a file is written under a temporary name beside its target
(`.tmp-<uuid>-<name>`), fsync'ed on local disks, then renamed. A new shard version is invisible
until `commit` replaces the manifest (also temp + rename; a single PUT on object stores, where a
PUT is atomic and a rename is a copy). A crash at any point leaves the last committed state
readable; the debris (temp files, uncommitted versions) is removed by `gc`.

Writers. Every manifest read-modify-write runs under a cross-process mutex: `manifest.lock`,
created with exclusive create (O_CREAT | O_EXCL) and removed after the update, so two processes
committing at once each keep their commit (a holder that died mid-update is recognised -- same
host and a dead pid, or older than MUTEX_STALE_S -- and its lock broken). Object stores offer no
exclusive create through pyarrow: there the mutex is the in-process lock only, and the lease
below is what keeps a second job out. Shard *files* may be written by any process (teacher
actors) through `write_shard`, which never touches the manifest.

One run per store: `acquire_lease(run)` writes `writer.lease` = {run, token, host, pid, job,
expires} and renews it every LEASE_TTL_S / 3 from a background thread. While a lease is live,
only handles carrying its token may change the manifest: the run's driver and the copies of its
handle it ships to its actors (the scheduler actor's refresh commits), because a pickled handle
keeps the token. A second job is refused, naming the holder and how to take over; a lease is
taken over once it expired (its holder stopped renewing) or, on the same host, once its pid is gone
(and by the holding process itself: a run re-run in one process).

Several teachers (`teachers:`, raydistill/teachers.py). Every shard the trainer reads is an ordinary
shard; which teacher(s) teach it is recorded under `state.teachers.groups` ({shard_id: teacher name
| "mixture"}). A routed shard holds rows of one teacher only and its versions record that teacher's
`teacher_rev` (and `teacher`: its name). A mixture shard has one *component* per teacher,
`<shard_id>@<teacher>` (`component_id`): an ordinary shard entry of the manifest with its own
versions, teacher_rev, produced_at_step and checksum, scoring the same input file; the shard's own
current version is the mix of its components' current versions (its record: `teacher_rev`
"mix:<hash>", `teachers` {name: {teacher_rev, version, produced_at_step}}, produced_at_step the
oldest component's). Components are never trained on: `shard_ids`, `pending`, `ages` and
`summary` leave them out unless asked; `verify_all`, `gc` and the version API treat them like any
shard, so a damaged component is re-scored and old component versions are collected.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import socket
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raydistill.errors import CorruptShardError, StoreError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MUTEX = "manifest.lock"
LEASE = "writer.lease"
LEASE_TTL_S = 300.0   # a lease not renewed for this long may be taken over (holder gone)
MUTEX_STALE_S = 30.0  # a manifest update takes milliseconds: an older lock is a dead holder's
RECORD_KEYS = ("rows", "checksum", "bytes", "teacher_rev", "format", "params",
               "produced_at_step", "policy_version")
_SHARD_ID = re.compile(r"^[A-Za-z0-9._-]+(@[A-Za-z0-9_-]+)?$")  # "@<teacher>": a mixture component
COMPONENT_SEP = "@"
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


def _read_json_file(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read() or b"null")
    except (FileNotFoundError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_gone(holder: dict, stale_s: float | None = None) -> bool:
    """A lock / lease whose holder can no longer act: expired, too old, or a dead pid on this host."""
    now = time.time()
    if "expires" in holder and now > float(holder["expires"]):
        return True
    if stale_s is not None and now - float(holder.get("at", now)) > stale_s:
        return True
    return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1)))


def _who(lease: dict) -> str:
    return (f"run {lease.get('run')!r} (job {lease.get('job') or '-'}, host {lease.get('host')}, "
            f"pid {lease.get('pid')})")


def target_params(targets: dict) -> tuple[str, dict]:
    """Split a targets dict {"format", **params} into (format, params) as stored in records."""
    return targets["format"], {k: v for k, v in targets.items() if k != "format"}


def component_id(shard_id: str, teacher: str) -> str:
    """The id of `teacher`'s component of mixture shard `shard_id` (see "Several teachers")."""
    return f"{shard_id}{COMPONENT_SEP}{teacher}"


def is_component(shard_id: str) -> bool:
    return COMPONENT_SEP in shard_id


def parent_id(shard_id: str) -> str:
    """The mixture shard a component belongs to (a shard's own id for any other shard)."""
    return shard_id.split(COMPONENT_SEP, 1)[0]


def _describe(d: dict) -> str:
    return json.dumps(d, sort_keys=True)


def _check_width(uri: str, have: dict, want: dict) -> None:
    """Refuse a store scored at another width W (models.ModelInfo): its ids could index past this run's
    narrowest head, or its targets lack rows this run's heads score. A store (or a caller) without
    "width" predates the field: nothing to compare."""
    if "width" not in have or "width" not in want or int(have["width"]) == int(want["width"]):
        return
    old, new = int(have["width"]), int(want["width"])
    why = (f"its ids up to {old - 1} would index past this run's narrowest head ({new} rows)" if old > new
           else f"its targets give ids {old}..{new - 1} no probability where this run's heads score them")
    raise StoreError(
        f"soft-target store {uri} was scored at width {old} (the narrowest output layer of the models that "
        f"built it), but this run's teacher(s) and student share width {new}: {why} — use a new "
        f"targets.store, or run with the models this store was built with (width {old})")


class SoftTargetStore:
    """A handle on one store; cheap to create, holds no cached state (the manifest is re-read)."""

    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None, lease_token: str | None = None):
        uri = str(uri)
        self._explicit_fs = filesystem
        self.lease_token = lease_token  # the writer lease this handle commits under (acquire_lease)
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
        # Ships to Ray tasks/actors; a filesystem derived from the uri is re-derived there. The
        # lease token travels too: the run's actors commit under the run's lease.
        return (type(self), (self.uri, self._explicit_fs, self.lease_token))

    def __repr__(self):
        return f"SoftTargetStore({self.uri!r})"

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, uri, *, tokenizer: dict, targets: dict, create: bool = True,
             filesystem: pafs.FileSystem | None = None, writer: str | None = None) -> "SoftTargetStore":
        """Open (or create) a store for a run; refuse one built for another tokenizer, width or format.
        `writer` (the run name): take the store's writer lease first, refused while another job holds it."""
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
            return store._leased(writer)
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
        _check_width(store.uri, have_tok, tokenizer)
        if m["targets"] != targets:
            old = m["targets"].get("schema") != targets.get("schema")
            raise StoreError(
                f"soft-target store {store.uri} holds targets {_describe(m['targets'])}, "
                f"but this run asks for targets {_describe(targets)}"
                + (" (its shards were written with another shard schema, by another raydistill version)"
                   if old else "") + f" — {fix}")
        return store._leased(writer)

    def _leased(self, writer: str | None) -> "SoftTargetStore":
        if writer is not None:
            self.acquire_lease(writer)
        return self

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
        _fault({"file": "after_temp_write", "manifest": "after_manifest_temp"}.get(kind, ""))
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
        """Read-modify-write of the manifest under the process lock and the cross-process mutex,
        by the lease holder only (when a lease is live); returns fn's result."""
        with self._lock, self._mutex():
            self._check_lease()
            m = self._read_manifest()
            out = fn(m)
            m["updated"] = _now()
            self._write_manifest(m)
            return out

    # ------------------------------------------------------------------ writers: mutex and lease
    @contextlib.contextmanager
    def _mutex(self, timeout_s: float = 120.0):
        """Exclusive-create lock file around one manifest update (local filesystems)."""
        if not self._local:
            yield
            return
        path = self.full_path(MUTEX)
        self._ensure_dir(path)
        me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}).encode()
        deadline, wait = time.monotonic() + timeout_s, 0.002
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                holder = _read_json_file(path)
                if holder is not None and _holder_gone(holder, MUTEX_STALE_S):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)  # a dead holder's lock: its update never completed
                    continue
                if time.monotonic() > deadline:
                    raise StoreError(f"{path} has been held for over {timeout_s:.0f} s by {holder} — if that "
                                     f"process is gone, delete {path}") from None
                time.sleep(wait)
                wait = min(wait * 2, 0.05)
        try:
            os.write(fd, me)
            os.close(fd)
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _read_lease(self) -> dict | None:
        try:
            with self.filesystem.open_input_file(self.full_path(LEASE)) as f:
                return json.loads(bytes(f.read_buffer()))
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # a torn lease file (object store PUT in flight): treated as none

    def _check_lease(self) -> None:
        lease = self._read_lease()
        if self._open_to_us(lease):
            return
        raise StoreError(f"soft-target store {self.uri} is being written by another job: {_who(lease)} — "
                         f"wait for it to finish, use another targets.store, or, if that job is gone, take "
                         f"over once its lease expires ({lease.get('expires_at')}) or delete "
                         f"{self.full_path(LEASE)}")

    def _open_to_us(self, lease: dict | None, token: str | None = None) -> bool:
        """No lease, ours, gone, or held by this very process (a process is not its own rival: its
        threads are serialised by the in-process lock, and a run re-run in-process takes over)."""
        token = token or self.lease_token
        return (lease is None or lease.get("token") == token or _holder_gone(lease)
                or (lease.get("host") == socket.gethostname() and lease.get("pid") == os.getpid()))

    def acquire_lease(self, run: str, *, ttl_s: float = LEASE_TTL_S, renew: bool = True) -> str:
        """Make this handle the store's one writer for `run`; returns the lease token. Refuses
        (StoreError naming the holder and how to take over) while another job's lease is live."""
        token = self.lease_token or uuid.uuid4().hex
        with self._lock, self._mutex():
            lease = self._read_lease()
            if not self._open_to_us(lease, token):
                raise StoreError(
                    f"soft-target store {self.uri} is in use by another job: {_who(lease)} — wait for it to "
                    f"finish, use another targets.store, or, if that job is gone, take over once its lease "
                    f"expires ({lease.get('expires_at')}) or delete {self.full_path(LEASE)}")
            self.lease_token = token
            self._write_lease(run, ttl_s)
        if renew:
            threading.Thread(target=self._renew_loop, args=(run, ttl_s), daemon=True,
                             name=f"lease-{run}").start()
            atexit.register(self.release_lease)
        return token

    def _write_lease(self, run: str, ttl_s: float) -> None:
        now = time.time()
        lease = {"run": run, "token": self.lease_token, "host": socket.gethostname(), "pid": os.getpid(),
                 "job": os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_SUBMISSION_ID"),
                 "acquired": now, "expires": now + ttl_s,
                 "expires_at": _dt.datetime.fromtimestamp(now + ttl_s, _dt.timezone.utc).isoformat(timespec="seconds")}
        self._put_atomic(self.full_path(LEASE), json.dumps(lease).encode(),
                         temp=self.filesystem.type_name not in _OBJECT_STORES, kind="lease")

    def _renew_loop(self, run: str, ttl_s: float) -> None:
        while self.lease_token is not None:
            time.sleep(ttl_s / 3)
            try:
                with self._lock, self._mutex():
                    lease = self._read_lease()
                    if self.lease_token is None or (lease or {}).get("token") != self.lease_token:
                        return  # released, or taken over after we stalled past the expiry
                    self._write_lease(run, ttl_s)
            except OSError:
                return  # the store is gone (deleted under us): nothing left to hold

    def release_lease(self) -> None:
        """Give the store up (the end of a run); a no-op if this handle holds no lease."""
        token, self.lease_token = self.lease_token, None
        if token is None:
            return
        with contextlib.suppress(OSError), self._lock, self._mutex():  # OSError: the store is gone
            if (self._read_lease() or {}).get("token") == token:
                self.filesystem.delete_file(self.full_path(LEASE))

    def manifest(self) -> dict:
        """A fresh read of manifest.json (sees commits made by other processes)."""
        return self._read_manifest()

    # ------------------------------------------------------------------ inputs
    def record_inputs(self, shards: dict[str, dict], eval_path: str | None, info: dict,
                      eval_checksum: str | None = None) -> None:
        """Register the input shards ({id: {"input": rel, "rows": n, "checksum": ...}}), the eval
        file (and its checksum) and info. Checksums are what `read_input_file` verifies."""
        for sid, rec in shards.items():
            if not _SHARD_ID.match(str(sid)):
                raise StoreError(f"invalid shard id {sid!r}: use letters, digits, '.', '_' or '-'")
            assert "input" in rec and "rows" in rec, rec

        def fn(m):
            m["inputs"] = {"shards": {k: dict(v) for k, v in shards.items()},
                           "eval": eval_path, "eval_checksum": eval_checksum, "info": dict(info)}
        self._update(fn)

    def has_inputs(self) -> bool:
        return bool(self.manifest()["inputs"].get("shards"))

    def shard_ids(self) -> list[str]:
        """Every shard with recorded inputs or committed versions, sorted (mixture components left out)."""
        return self._trained_ids(self.manifest())

    @staticmethod
    def _trained_ids(m: dict) -> list[str]:
        return sorted(s for s in set(m["inputs"].get("shards") or {}) | set(m["shards"]) if not is_component(s))

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
        """A shard's input rows, checked against the checksum and row count the manifest records."""
        shards = self.manifest()["inputs"].get("shards") or {}
        if shard_id not in shards:
            raise StoreError(f"store {self.uri} has no inputs for shard {shard_id!r} — "
                             "run the data phase (record_inputs) first")
        return self.read_input_file(shards[shard_id]["input"])

    def read_input_file(self, rel: str) -> pa.Table:
        """An inputs file (a train shard's or the eval file) by its store-relative path, verified
        against the manifest's checksum; a damaged one raises CorruptShardError naming it. Files the
        manifest has no checksum for (generated on-policy inputs, stores built before checksums
        were recorded) are read as they are."""
        inputs = self.manifest()["inputs"]
        recs = [dict(r, shard=sid) for sid, r in (inputs.get("shards") or {}).items() if r.get("input") == rel]
        if rel == inputs.get("eval") and inputs.get("eval_checksum"):
            recs.append({"shard": "eval", "input": rel, "checksum": inputs["eval_checksum"],
                         "rows": inputs.get("info", {}).get("eval_rows")})
        rec = recs[0] if recs and recs[0].get("checksum") else None
        if rec is None:
            return pq.read_table(self.full_path(rel), filesystem=self.filesystem)
        return self._load(rec["shard"], {"path": rel, "checksum": rec["checksum"], "rows": rec.get("rows"),
                                         "bytes": rec.get("bytes")},
                          verify=True, parse=True, what=f"input shard {rec['shard']}",
                          fix=f"the inputs are damaged: restore the file, or delete {self.uri} so that the data "
                              "phase rebuilds them from the corpus")

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
    def _load(self, shard_id: str, rec: dict, *, verify: bool, parse: bool, what: str | None = None,
              fix: str = "invalidate it (store.invalidate) so the next teacher pass rewrites it") -> pa.Table | None:
        """The file of `rec` (path, checksum, rows[, bytes, version]) read once, checked, parsed."""
        path = self.full_path(rec["path"])
        what = what or f"shard {shard_id} v{rec.get('version')}"

        def corrupt(problem, expected, found):
            e = CorruptShardError(f"{what} at {path}: {problem} (expected {expected}, found {found}) — {fix}")
            e.shard_id, e.version, e.path = shard_id, rec.get("version"), path
            return e

        try:
            with self.filesystem.open_input_file(path) as f:
                data = f.read_buffer()  # read once: the checksum and the parse see the same bytes
        except FileNotFoundError:
            raise corrupt("file missing", f"{rec.get('bytes', '?')} bytes", "no file") from None
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
        if verify and rec.get("rows") is not None and rows != rec["rows"]:
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
    def pending(self, teacher_rev: str, targets: dict, shard_ids: list[str] | None = None) -> list[str]:
        """Shards a pass for (teacher_rev, targets) must score: no current version, or another
        teacher revision / format / params. What makes a pass resumable. `shard_ids`: look at these
        (e.g. one teacher's shards and components) instead of every trained shard."""
        fmt, params = target_params(json.loads(json.dumps(targets)))
        m = self.manifest()
        out = []
        for sid in (sorted(shard_ids) if shard_ids is not None else self._trained_ids(m)):
            rec = self._current(m, sid)
            if (rec is None or rec["teacher_rev"] != teacher_rev or rec["format"] != fmt
                    or rec["params"] != params):
                out.append(sid)
        return out

    def ages(self, step: int) -> dict[str, int]:
        """{shard_id: step - produced_at_step} for shards with a current version."""
        m = self.manifest()
        return {sid: step - rec["produced_at_step"] for sid in sorted(m["shards"])
                if not is_component(sid) and (rec := self._current(m, sid)) is not None}

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
        cur = {sid: self._current(m, sid) for sid in self._trained_ids(m)}
        live = {sid: r for sid, r in cur.items() if r is not None}
        rows = sum(r["rows"] for r in live.values())
        nbytes = sum(r["bytes"] for r in live.values())
        out = {"uri": self.uri, "shards": len(cur), "shards_current": len(live), "rows": rows,
               "bytes": nbytes, "current": {sid: (r["version"] if r else None) for sid, r in cur.items()}}
        components = [r for sid in m["shards"] if is_component(sid) and (r := self._current(m, sid))]
        if components:  # the teachers' own targets a mixture is drawn from (bytes beside the trained ones)
            out["component_bytes"] = sum(r["bytes"] for r in components)
        seq_len = m["inputs"].get("info", {}).get("seq_len")
        if seq_len:
            out["tokens"] = rows * int(seq_len)
            out["bytes_per_token"] = nbytes / out["tokens"] if out["tokens"] else None
        return out
