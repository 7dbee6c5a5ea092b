"""Several teachers (`teachers:`): each row is taught by the teacher `routing` names for it, or by
the weighted mixture of all of them; every teacher keeps its own replicas, revision and provenance.

Which teacher teaches which row is decided per *shard*: the data phase packs the documents of one
routing group (a teacher name, or "mixture" for every row no routing value maps to one teacher,
and for every row when there is no `routing`) into shards of their own, so a packed window never
mixes domains and a shard is scored by exactly the teachers it needs. The group of every shard is
recorded in the store (`state.teachers.groups`); the layout is in `store.py`'s docstring. The
trainer reads shards in sorted id order, so the routed ids interleave the groups (`_interleave`):
a student sees the domains in turn through an epoch, not one domain and then the next.

    routed shard   <n>-<group>          scored by its teacher only; each version records that
                                        teacher's teacher_rev and name
    mixture shard  <n> | <n>-mixture    one component per teacher, <shard>@<teacher>, each an
                                        ordinary shard entry with its own versions, teacher_rev,
                                        produced_at_step; the shard's own version is their mix

Each teacher's pass is `teacher.run_teacher_pass` with that teacher as `cfg.teacher`
(`for_teacher`): its own Ray Data actor pool, placement (`teachers[i].gpus_per_replica`,
`resources`), dtype and batch size. What a teacher must score is `store.pending` over its routed
shards and components, so a new revision of one teacher re-scores only what it teaches (and the
mixes it is part of are re-drawn from the stored components: no other teacher runs again).

The mix (`mix_sampled`, in the driver, no model): a mixture row holds `targets.samples` = N draws
from each teacher (its component, a full-fidelity sample of that teacher alone); the mix keeps a
uniformly chosen N_i of teacher i's N draws, N_i = N w_i / sum w (largest remainder), so the mixed
counts are a stratified sample of m = sum_i (N_i / N) p_i: unbiased for m when N w_i / sum w are
integers (a weight is otherwise realised to within 1/(2N)). label_logprob is exact:
log sum_i w_i p_i(label). The stored entropy is sum_i w_i H(p_i), a lower bound of H(m) (H(m) needs
both teachers' full distributions at one place): the *logged* kd value of a mixture row is then
high by the teachers' generalised Jensen-Shannon divergence (at most H(w), log 2 for two equal
weights); the gradient does not use it. topk / dense targets cannot be mixed this way (config refuses).

What the student learns from a mixture row: forward KL to m. Because KL(m||q) = -H(m) - sum_v m log q
and sum_i w_i KL(p_i||q) = -sum_i w_i H(p_i) - sum_v m log q, the two differ by a constant in q:
the same gradient, so the mix is exactly "the weighted sum of per-teacher forward KLs". Reverse KL,
JSD and TVD are not linear in the target: with a mixture they measure the divergence from m itself
(mode-seeking towards m, not towards each teacher), which is what this store gives them — not
sum_i w_i D(p_i, q).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import MIXTURE, TeacherConfig
from .errors import ConfigError, StoreError
from .log import log
from .store import component_id, is_component, parent_id

STATE_KEY = "teachers"


# ---------------------------------------------------------------- the config's teachers

def names(cfg) -> list[str]:
    return [e.name for e in cfg.teachers]


def weights(cfg) -> dict[str, float]:
    return {e.name: float(e.weight) for e in cfg.teachers}


def for_teacher(cfg, name: str):
    """The run's config with `name` as its one teacher: what teacher.py, the refresh pool and
    evaluation take (they read `cfg.teacher`)."""
    entry = next(e for e in cfg.teachers if e.name == name)
    teacher = TeacherConfig(**{f.name: getattr(entry, f.name) for f in dataclasses.fields(TeacherConfig)})
    return dataclasses.replace(cfg, teacher=teacher, teachers=[], routing=None, compare_single_teacher=None)


def revisions(cfg) -> dict[str, str]:
    """{teacher name: teacher_rev}: re-read at every pass, so a new checkpoint at a teacher's path
    is a new revision of that teacher only."""
    from .models import model_revision

    return {e.name: model_revision(e.model, e.revision) for e in cfg.teachers}


def routing_key(cfg) -> dict | None:
    """The routing as recorded with the inputs: a store built with another routing is refused."""
    ro = cfg.routing
    return None if ro is None else {"column": ro.column, "teachers": dict(sorted(ro.teachers.items())),
                                    "default": ro.default}


# ---------------------------------------------------------------- before Ray starts

def preflight(cfg, info) -> None:
    """Every teacher loads safely and shares the first teacher's (and so the student's) tokenizer,
    with an output layer at least as wide (heads may differ: `info` is narrowed to the shared width
    W, models.ModelInfo); the routing column exists and every value has a teacher. One ConfigError
    listing every problem."""
    from .models import check_weights, head_problem, max_positions, same_tokenizer, vocabulary_of

    problems, first = [], cfg.teachers[0]
    for i, e in enumerate(cfg.teachers[1:], 1):
        key = f"teachers[{i}].model"
        check_weights(e.model, allow_pickle_weights=e.allow_pickle_weights, key=key)
        conf, fp = vocabulary_of(e.model, key=key, trust_remote_code=e.trust_remote_code, revision=e.revision)
        if not same_tokenizer(fp, info.tokenizer):
            problems.append(
                f"{key}: the vocabulary of teacher {e.name!r} ({e.model}: {fp['vocab_size']} tokens, "
                f"{fp['hash']}) differs from teacher {first.name!r}'s ({first.model}: "
                f"{info.tokenizer['vocab_size']} tokens, {info.tokenizer['hash']}) "
                "— every teacher and the student must share one tokenizer for logit distillation: use "
                "teachers of one model family")
        elif (bad := head_problem(key, e.model, conf, fp)) is not None:
            problems.append(bad)
        else:
            info.narrow(conf.vocab_size)
        n_pos = max_positions(conf)
        if n_pos is not None and cfg.data.seq_len > n_pos:
            problems.append(f"data.seq_len: {cfg.data.seq_len} exceeds the maximum of {n_pos} positions of "
                            f"teacher {e.name!r} ({e.model}) — use data.seq_len<={n_pos}")
    if cfg.routing is not None:
        problems += _routing_problems(cfg)
    if problems:
        raise ConfigError(problems)


def _value_key(v) -> str:
    """A routing value as `routing.teachers` spells it (YAML keys are strings)."""
    return "null" if v is None else str(v)


def _corpus_table(cfg, columns: list[str] | None) -> pa.Table:
    """The corpus (its first data.max_rows rows) read in the driver, `columns` only if given. The
    routing column has to be seen whole before Ray starts (unmapped values are refused)."""
    import pyarrow.json as pajson

    from .data import resolve_corpus

    fs, files, fmt = resolve_corpus(cfg.data)
    opener, parts, left = fs.open if fs is not None else open, [], cfg.data.max_rows or float("inf")
    for path in files:
        with opener(path, "rb") as f:
            table = pq.read_table(f) if fmt == "parquet" else pajson.read_json(f)
        missing = [c for c in columns or [] if c not in table.column_names]
        if missing and table.num_rows:
            raise ConfigError([f"routing.column: column {missing[0]!r} is not in {path} (columns: "
                               f"{', '.join(table.column_names[:10])}) — set routing.column to the column "
                               "that names each row's domain"])
        table = table.select(columns) if columns else table
        parts.append(table.slice(0, int(min(left, table.num_rows))))
        left -= parts[-1].num_rows
        if left <= 0:
            break
    return pa.concat_tables(parts, promote_options="default")


def row_groups(cfg, table: pa.Table) -> list[str | None]:
    """Each corpus row's group: the teacher its routing value names, routing.default, or None."""
    ro = cfg.routing
    return [ro.teachers.get(_value_key(v), ro.default) for v in table.column(ro.column).to_pylist()]


def _routing_problems(cfg) -> list[str]:
    ro = cfg.routing
    try:
        table = _corpus_table(cfg, [ro.column])
    except ConfigError as e:
        return list(e.errors)
    values = [_value_key(v) for v, g in zip(table.column(ro.column).to_pylist(), row_groups(cfg, table)) if g is None]
    if not values:
        return []
    distinct = sorted(set(values))
    few = ", ".join(repr(v) for v in distinct[:8]) + (f" (+{len(distinct) - 8} more)" if len(distinct) > 8 else "")
    return [f"routing.teachers: {len(values)} row(s) of column {ro.column!r} have values no teacher is named for "
            f"({few}) and routing.default is not set — map them under routing.teachers, or set routing.default "
            f"to a teacher name or {MIXTURE}"]


# ---------------------------------------------------------------- the data phase

class _GroupInputs:
    """The store as `data.build_inputs` sees it while it builds one routing group's inputs: files go
    into the run's store under group-prefixed names, seq_ids are offset so groups never share one,
    and what it records is kept here for the caller to record once for all groups."""

    def __init__(self, store, group: str, base: int):
        self.store, self.group, self.base = store, group, base
        self.shards, self.info, self.eval = {}, {}, None

    def has_inputs(self) -> bool:
        return False

    def write_file(self, rel: str, table: pa.Table) -> dict:
        table = table.set_column(0, "seq_id", pc.add(table.column("seq_id"), pa.scalar(self.base, pa.int64())))
        if rel.startswith("inputs/train/"):
            rel = f"inputs/train/{self.group}-{rel.rsplit('/', 1)[1]}"
        else:
            rel, self.eval = f"inputs/eval-{self.group}.parquet", table
        return self.store.write_file(rel, table)

    def record_inputs(self, shards: dict, eval_path, info: dict, eval_checksum=None) -> None:
        self.shards = dict(sorted(shards.items()))  # given run-wide ids by `_interleave`
        self.info = dict(info, eval=eval_path, eval_checksum=eval_checksum)


def build_inputs(cfg, store, info) -> dict:
    """The data phase of a run with several teachers: without routing, the one-teacher inputs (every
    shard a mixture shard); with routing, one set of shards per routing group. Records each shard's
    group in the store; a re-run with the same corpus and routing reuses everything."""
    from . import data

    recorded = data.check_recorded_inputs(cfg, store, info)
    if recorded is not None:
        if recorded.get("routing") != routing_key(cfg):
            raise StoreError(f"targets.store: {store.uri} was built with routing {recorded.get('routing')}, this run "
                             f"routes {routing_key(cfg)} — use another targets.store or delete it")
        out, groups = dict(recorded, skipped=True), shard_groups(store)
    elif cfg.routing is None:
        out, groups = data.build_inputs(cfg, store, info), {}
    else:
        out, groups = _build_routed(cfg, store, info)
    # Without routing every shard is a mixture shard (also those of a store a one-teacher run built).
    groups = groups or {sid: MIXTURE for sid in store.shard_ids()}
    store.update_state(STATE_KEY, {"groups": groups, "weights": weights(cfg), "routing": routing_key(cfg)})
    return out


def _build_routed(cfg, store, info) -> tuple[dict, dict[str, str]]:
    """Each routing group's documents packed into shards of their own (`data.build_inputs` run per
    group on a Parquet file of its rows), then recorded in the store as one set of inputs.
    Returns (what was recorded, {shard_id: group})."""
    from . import data

    table = _corpus_table(cfg, None)
    row_group = row_groups(cfg, table)
    views, counts = [], {"docs": 0, "skipped_rows": 0, "train_rows": 0, "eval_rows": 0}
    with tempfile.TemporaryDirectory(prefix="raydistill-routing-") as tmp:
        for i, group in enumerate(sorted(set(row_group))):
            path = os.path.join(tmp, f"{group}.parquet")
            pq.write_table(table.take([j for j, g in enumerate(row_group) if g == group]), path)
            sub = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=path, max_rows=None))
            view = _GroupInputs(store, group, base=i << 40)
            try:
                data.build_inputs(sub, view, info)
            except ConfigError as e:
                raise ConfigError([f"routing: the rows routed to {group!r} — {p}" for p in e.errors]) from None
            views.append(view)
            for k in counts:
                counts[k] += int(view.info.get(k, 0))
    evals = [v.eval for v in views if v.eval is not None and v.eval.num_rows]
    eval_table = pa.concat_tables(evals) if evals else views[0].eval
    written = store.write_file("inputs/eval.parquet", eval_table)
    fs, files, _ = data.resolve_corpus(cfg.data)
    recorded = dict(counts, fingerprint=data.corpus_fingerprint(fs, files, cfg.data, info.tokenizer["hash"]),
                    data_path=cfg.data.path, seq_len=cfg.data.seq_len, files=len(files),
                    shards=sum(len(v.shards) for v in views), routing=routing_key(cfg),
                    groups={v.group: {k: v.info.get(k) for k in ("train_rows", "eval_rows", "docs", "eval")}
                            for v in views})
    ids = _interleave({v.group: len(v.shards) for v in views})
    shards = {ids[(v.group, j)]: rec for v in views for j, rec in enumerate(v.shards.values())}
    store.record_inputs(dict(sorted(shards.items())), written["path"], recorded, eval_checksum=written["checksum"])
    return dict(recorded, skipped=False), {ids[(v.group, j)]: v.group for v in views for j in range(len(v.shards))}


def _interleave(counts: dict[str, int]) -> dict[tuple[str, int], str]:
    """{(group, j): shard id} for the j-th of each group's shards: `<position>-<group>`, positions
    spreading each group's k shards evenly over the sorted order the trainer reads them in (the j-th
    at (j + 1/2) / k of an epoch). Group-major ids would train on one domain's rows, then the next's
    — and a small student forgets the first domain while it learns the second."""
    order = sorted(((j + 0.5) / k, g, j) for g, k in counts.items() for j in range(k))
    width = max(5, len(str(len(order))))
    return {(g, j): f"{pos:0{width}d}-{g}" for pos, (_, g, j) in enumerate(order)}


# ---------------------------------------------------------------- what each teacher scores

def shard_groups(store) -> dict[str, str]:
    """{shard_id: teacher name | "mixture"} as the data phase recorded it."""
    return dict((store.state(STATE_KEY) or {}).get("groups") or {})


def taught_by(groups: dict[str, str], name: str) -> list[str]:
    """The store entries teacher `name` scores: its routed shards and its mixture components."""
    return sorted([sid for sid, g in groups.items() if g == name] +
                  [component_id(sid, name) for sid, g in groups.items() if g == MIXTURE])


def score_pending(cfg, store, vocab_size: int, metrics=None, *, step: int = -1, source: str = "initial",
                  seed: int | None = None, only: list[str] | None = None, pool_for=None,
                  on_commit=None) -> list[dict]:
    """Each teacher's pass over what it teaches that has no current version of its revision (or,
    with `only`, over those shards whatever their version: a refresh), then the mixes whose
    components changed. Returns one stats dict per teacher that scored something (each with
    "teacher"), plus one for the mixes ("teacher": "mixture") when any was drawn.
    `pool_for(teacher_rev, name)`: long-lived replicas (refresh) instead of a Ray Data pool;
    `on_commit(shard_id, record)` hears every trained shard committed (routed or mixed)."""
    from .cluster import wait_for_nodes
    from .teacher import run_teacher_pass, target_params

    params, revs = target_params(cfg.targets), revisions(cfg)
    if only is None:
        for sid, reason in store.verify_all().items():  # components too: a damaged one is re-scored
            log(f"shard {sid} is damaged ({reason}); it will be re-scored")
            store.invalidate(sid, reason)
    groups = shard_groups(store)
    inputs = store.manifest()["inputs"]["shards"]
    passes = []

    def trained(sid, record):  # a component's commit is not a new version of anything trained on
        if on_commit is not None and not is_component(sid):
            on_commit(sid, record)

    for name in names(cfg):
        mine = taught_by(groups, name)
        todo = store.pending(revs[name], params, mine) if only is None else \
            [s for s in mine if parent_id(s) in only]
        if not todo:
            continue
        one = for_teacher(cfg, name)
        if pool_for is None:
            wait_for_nodes(one, "teacher")
        log(f"teacher {name}: pass over {len(todo)} of the {len(mine)} shards and components it teaches")
        passes.append(run_teacher_pass(
            one, store, todo, vocab_size=vocab_size, teacher_rev=revs[name], step=step, source=source,
            seed=cfg.run.seed if seed is None else seed, metrics=metrics, teacher=name, on_commit=trained,
            inputs={c: inputs[parent_id(c)]["input"] for c in todo if is_component(c)},
            pool=pool_for(revs[name], name) if pool_for is not None else None))
    mixed = mix_pending(cfg, store, vocab_size, groups, on_commit=on_commit)
    if mixed["shards"]:
        passes.append(mixed)
    return passes


def refresh_pass(cfg, store, decision, on_commit, *, pool_for, vocab_size: int, seed: int, metrics=None) -> dict:
    """A refresh pass (refresh/passes.py) over `decision.shard_ids`: each shard re-scored by the
    teacher(s) it has, on their long-lived pools, mixture shards re-mixed. Stats as the scheduler
    logs them: rows = trained rows refreshed, tokens = teacher compute (every teacher's tokens)."""
    passes = score_pending(cfg, store, vocab_size, metrics, step=decision.step, source=cfg.refresh.source,
                           seed=seed, only=list(decision.shard_ids), pool_for=pool_for, on_commit=on_commit)
    scored = [p for p in passes if p["teacher"] != MIXTURE]
    mixed = next((p for p in passes if p["teacher"] == MIXTURE), {"rows": 0, "shards": 0})
    groups = shard_groups(store)
    n_mixture = sum(groups.get(s) == MIXTURE for s in decision.shard_ids)
    # Each teacher scored its routed rows plus every mixture row: count a mixture row once.
    rows = sum(p["rows"] for p in scored) - mixed["rows"] * (len(names(cfg)) - 1)
    return {"rows": rows, "tokens": sum(p["tokens"] for p in scored), "seconds": sum(p["seconds"] for p in passes),
            "shards": len(decision.shard_ids), "replicas": sum(p.get("replicas", 0) for p in scored),
            "complete": all(p.get("complete", True) for p in scored) and mixed["shards"] == n_mixture,
            "teacher_rev": json.dumps(revisions(cfg), sort_keys=True),
            "teachers": {p["teacher"]: {k: p[k] for k in ("rows", "tokens", "seconds")} for p in passes}}


# ---------------------------------------------------------------- ages per teacher (refresh)

def produced_by_teacher(record: dict | None) -> dict[str, int]:
    """{teacher: produced_at_step} of the targets a trained shard's current version holds: a routed
    shard's one teacher, or each component of a mix (whose own produced_at_step is the oldest of
    them). {} for a one-teacher store (its records name no teacher)."""
    if not record:
        return {}
    if record.get("teachers"):
        return {n: int(p["produced_at_step"]) for n, p in record["teachers"].items()}
    return {record["teacher"]: int(record["produced_at_step"])} if record.get("teacher") else {}


def max_ages(produced_by: dict[str, dict[str, int]], step: int) -> dict[str, int]:
    """{teacher: the largest age at `step` of its targets over the trained shards}, from
    {shard_id: produced_by_teacher(record)}."""
    out: dict[str, int] = {}
    for per in produced_by.values():
        for name, produced in per.items():
            out[name] = max(out.get(name, step - produced), step - produced)
    return out


# ---------------------------------------------------------------- compare_single_teacher

class _SingleTeacherView:
    """The store as `train.fit_student` sees it for a student of one teacher alone: the same input
    rows, each shard read as that teacher's own targets (its routed shard, or its component)."""

    def __init__(self, store, shard_ids: list[str]):
        self.uri, self._store, self._ids = store.uri, store, shard_ids

    def shard_ids(self) -> list[str]:
        return list(self._ids)

    def manifest(self) -> dict:
        return self._store.manifest()


def single_teacher_ids(store, name: str) -> list[str]:
    """What a student of `name` alone trains on: `name`'s routed shards, and `name`'s component of
    every other shard (mixture components exist; others' routed shards get one from `score_single`)."""
    return sorted(sid if g == name else component_id(sid, name) for sid, g in shard_groups(store).items())


def score_single(cfg, store, vocab_size: int, name: str, metrics=None) -> dict | None:
    """`name`'s pass over the rows the other teachers teach alone: what compare_single_teacher costs
    in teacher compute (resumable like any pass; never part of the run's own student)."""
    from .teacher import run_teacher_pass, target_params

    groups, rev = shard_groups(store), revisions(cfg)[name]
    extra = [component_id(sid, name) for sid, g in groups.items() if g not in (name, MIXTURE)]
    todo = store.pending(rev, target_params(cfg.targets), extra)
    if not todo:
        return None
    inputs = store.manifest()["inputs"]["shards"]
    log(f"compare_single_teacher: teacher {name} scores the {len(todo)} shard(s) other teachers teach")
    return run_teacher_pass(for_teacher(cfg, name), store, todo, vocab_size=vocab_size, teacher_rev=rev, step=-1,
                            source="compare_single_teacher", seed=cfg.run.seed, metrics=metrics, teacher=name,
                            inputs={c: inputs[parent_id(c)]["input"] for c in todo})


def train_single_teacher(cfg, store, vocab_size: int, name: str):
    """The same student distilled from teacher `name` alone (no refresh): (final state, result)."""
    from .train import fit_student, read_final_state

    view = _SingleTeacherView(store, single_teacher_ids(store, name))
    result, _ = fit_student(cfg, view, vocab_size, label=f"single_{name}")
    if result.error:
        raise result.error
    return read_final_state(result), result


# ---------------------------------------------------------------- the mixture

def mix_revision(components: dict[str, dict], weights_: dict[str, float]) -> str:
    """The teacher_rev of a mix: which version of which teacher's targets, at which weight."""
    key = [[n, c["teacher_rev"], int(c["version"]), weights_[n]] for n, c in sorted(components.items())]
    return "mix:" + hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def mix_pending(cfg, store, vocab_size: int, groups: dict[str, str], on_commit=None) -> dict:
    """Draw the mix of every mixture shard whose current version is not the mix of its components'
    current versions (a component was re-scored); shards with a component missing wait."""
    import time

    from .teacher import target_params, task_seed
    from .targets import build_table
    from .tasks.base import int_matrix

    start, stats = time.perf_counter(), {"teacher": MIXTURE, "source": "mixture", "shards": 0, "rows": 0,
                                         "tokens": 0, "bytes": 0}
    fmt, w = target_params(cfg.targets)["format"], weights(cfg)
    params = {k: v for k, v in target_params(cfg.targets).items() if k != "format"}
    for sid in sorted(s for s, g in groups.items() if g == MIXTURE):
        comps = {n: store.current(component_id(sid, n)) for n in names(cfg)}
        if any(c is None for c in comps.values()):
            continue
        rev, cur = mix_revision(comps, w), store.current(sid)
        if cur is not None and cur["teacher_rev"] == rev and cur["format"] == fmt and cur["params"] == params:
            continue
        tables = [store.read_shard(component_id(sid, n)) for n in comps]
        version = store.next_version(sid)
        rng = np.random.default_rng(task_seed(cfg.run.seed, sid, version))
        first = tables[0]
        table = build_table(mix_sampled(tables, [w[n] for n in comps], cfg.targets.samples, rng),
                            seq_id=first.column("seq_id").to_numpy(), input_ids=int_matrix(first.column("input_ids")),
                            policy_version=first.column("policy_version").to_numpy(), fmt=fmt, vocab_size=vocab_size)
        written = store.write_shard(sid, version, table)
        record = {"rows": written["rows"], "checksum": written["checksum"], "bytes": written["bytes"],
                  "teacher_rev": rev, "format": fmt, "params": params, "source": "mixture",
                  "produced_at_step": min(int(c["produced_at_step"]) for c in comps.values()),
                  "policy_version": -1,
                  "teachers": {n: {k: c[k] for k in ("teacher_rev", "version", "produced_at_step")}
                               for n, c in comps.items()}}
        store.commit(sid, version, record)
        if on_commit is not None:
            on_commit(sid, record)
        stats["shards"] += 1
        stats["rows"] += record["rows"]
        stats["bytes"] += record["bytes"]
    seconds = time.perf_counter() - start
    return dict(stats, seconds=seconds, rows_per_s=stats["rows"] / max(seconds, 1e-9), tokens_per_s=0.0)


def allocate(weights_: list[float], n: int) -> list[int]:
    """n draws split in proportion to the weights, largest remainder first (they sum to n)."""
    exact = np.asarray(weights_, dtype=np.float64) * n / float(sum(weights_))
    out = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - out), kind="stable")[: n - int(out.sum())]:
        out[i] += 1
    return out.tolist()


def _list_values(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)


def mix_sampled(tables: list[pa.Table], weights_: list[float], samples: int, rng: np.random.Generator) -> dict:
    """The `sampled` columns of the mix of teachers' shards of the same rows (see the module doc):
    per position, a uniform choice of N_i of teacher i's `samples` draws (`allocate`)."""
    rows = tables[0].num_rows
    parts = []
    for table, n in zip(tables, allocate(weights_, samples)):
        ids = _list_values(table, "sample_ids").astype(np.int64)
        draws = np.repeat(ids, _list_values(table, "sample_counts").astype(np.int64)).reshape(-1, samples)
        keep = np.argsort(rng.random(draws.shape), axis=1)[:, :n]
        parts.append(np.take_along_axis(draws, keep, axis=1))
    draws = np.sort(np.concatenate(parts, axis=1), axis=1)                      # [positions, samples]
    new = np.ones(draws.shape, dtype=bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    starts = np.flatnonzero(new)
    counts = np.diff(starts, append=draws.size)
    lens = new.sum(1).reshape(rows, -1)
    cuts = np.cumsum(lens.sum(1))[:-1]
    w = np.asarray(weights_, dtype=np.float64) / float(sum(weights_))
    label = np.stack([_list_values(t, "label_logprob").astype(np.float64) for t in tables])   # [teachers, P]
    mixed_label = np.log(np.maximum((w[:, None] * np.exp(label)).sum(0), 1e-300))
    entropy = sum(wi * _list_values(t, "entropy").astype(np.float64) for wi, t in zip(w, tables))
    tc = tables[0].column("capture_temperature").to_numpy()
    return {"capture_temperature": list(tc),
            "label_logprob": list(np.clip(mixed_label, -65504, 0).astype(np.float16).reshape(rows, -1)),
            "sample_ids": np.split(draws[new], cuts), "sample_counts": np.split(counts, cuts),
            "sample_len": list(lens), "entropy": list(np.clip(entropy, 0, 65504).astype(np.float16).reshape(rows, -1))}


# ---------------------------------------------------------------- evaluation and the report

def evaluate(cfg, store, student_dirs: dict, max_rows: int = 512) -> dict:
    """Held-out metrics of each student against each teacher, on all held-out rows and on the rows
    that teacher teaches alone (its routing group): {name: {"all_rows": ..., "own_rows": ...}} with
    `evaluate.evaluate_students`'s figures (in a task placed like that teacher's replicas)."""
    import ray

    from .evaluate import submit_evaluation

    inputs = store.manifest()["inputs"]
    groups = inputs["info"].get("groups") or {}
    if inputs["info"].get("eval_rows", 0) == 0:
        return {}
    refs = {}
    for name in names(cfg):
        one = for_teacher(cfg, name)
        evals = {"all_rows": inputs["eval"]}
        if (groups.get(name) or {}).get("eval_rows"):
            evals["own_rows"] = groups[name]["eval"]
        for part, rel in evals.items():
            refs[(name, part)] = submit_evaluation(one, store.uri, rel, student_dirs, max_rows)
    out: dict = {}
    for (name, part), ref in refs.items():
        out.setdefault(name, {})[part] = ray.get(ref)
    return out


def report_section(cfg, store, passes: list[dict], refresh: dict | None, step: int) -> dict:
    """Per teacher: what it teaches (routed and mixture rows, tokens), its teacher compute (initial
    and refresh passes, and the compare_single_teacher pass: forward tokens; seconds of all), its
    revision, the largest age at `step` of the targets it produced (`max_age`) and the largest age of
    them any training step saw (`max_age_seen`: the refresh scheduler's record; without refresh ages
    only grow, so it is the last step's)."""
    m, groups = store.manifest(), shard_groups(store)
    rows_of = {sid: rec["rows"] for sid, rec in m["inputs"]["shards"].items()}
    seq_len = int(m["inputs"]["info"].get("seq_len") or cfg.data.seq_len)
    refresh_log = (refresh or {}).get("pass_log") or []
    seen = (refresh or {}).get("max_age_seen_by_teacher") or {}
    out = {}
    for e in cfg.teachers:
        routed = sum(rows_of.get(s, 0) for s, g in groups.items() if g == e.name)
        mixture = sum(rows_of.get(s, 0) for s, g in groups.items() if g == MIXTURE)
        mine = [p for p in passes if p.get("teacher") == e.name]
        compare = [p for p in mine if p.get("source") == "compare_single_teacher"]
        again = [p["teachers"][e.name] for p in refresh_log if e.name in (p.get("teachers") or {})]
        produced = [rec["produced_at_step"] for s in taught_by(groups, e.name) if (rec := store.current(s))]
        out[e.name] = {"model": e.model, "weight": e.weight, "teacher_rev": revisions(cfg)[e.name],
                       "routed_rows": routed, "mixture_rows": mixture, "rows": routed + mixture,
                       "tokens": (routed + mixture) * seq_len,
                       "teacher_tokens": {"initial": sum(p["tokens"] for p in mine if p not in compare),
                                          "refresh": sum(p["tokens"] for p in again),
                                          "compare_single_teacher": sum(p["tokens"] for p in compare)},
                       "teacher_seconds": round(sum(p["seconds"] for p in mine + again), 3),
                       "max_age": step - min(produced) if produced else None}
        out[e.name]["max_age_seen"] = seen.get(e.name, out[e.name]["max_age"])
    return out
