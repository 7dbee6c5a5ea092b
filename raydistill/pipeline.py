"""One distillation run, phase by phase: check → inputs → teacher pass → train → export → eval → report.

Every phase is resumable: inputs already recorded are kept, shards already committed for this
teacher revision and format are not re-scored, training continues from its newest checkpoint.
Everything that can be checked without a cluster (config, models, vocabularies, paths) is checked
before Ray starts, so bad input leaves the store and the outputs as they were. Joining Ray, the
resource checks and waiting for autoscaled nodes live in `cluster`; export in `export`;
evaluation in `evaluate`; the report's assembly in `report`.
"""
from __future__ import annotations

import os
import time

from .cluster import check_resources, init_ray, output_dir, wait_for_nodes
from .errors import ConfigError
from .export import export_student
from .log import log

NAMESPACE = "raydistill"


def run(cfg) -> dict:
    """All phases of one run; returns the report (also written to <output_dir>/report.json)."""
    from .answers import add_answer_accuracy
    from .data import build_inputs
    from .evaluate import evaluate_students
    from .generate_pass import generate_pending
    from .metrics import RunMetrics
    from .report import build_report, write_report

    clock = PhaseClock()
    info = preflight(cfg)
    clock.lap("preflight")
    init_ray(cfg)
    for one in teacher_configs(cfg):  # each teacher's replicas are placed as its own entry says
        check_resources(one)
    metrics = RunMetrics(cfg.run.name)
    out = output_dir(cfg)
    os.makedirs(out, exist_ok=True)
    clock.lap("ray_start")
    store = open_store(cfg, info)
    try:
        if cfg.teachers:  # several teachers: shards per routing group, one pass per teacher, then the mixes
            from . import teachers

            inputs = teachers.build_inputs(cfg, store, info)
            clock.lap("inputs")
            passes = teachers.score_pending(cfg, store, info.vocab_size, metrics)
        else:
            inputs = build_inputs(cfg, store, info)
            clock.lap("inputs")
            # The teacher writes the responses first (generate.enabled), then they are scored like any rows.
            generated = generate_pending(cfg, store, info, metrics)
            if generated:
                clock.lap("generate")
            first = None if cfg.train.online else score_pending(cfg, store, info, metrics)
            passes = [p for p in (generated, first) if p]
        clock.lap("teacher_pass")
        state, total, refresh, result = train_student(cfg, store, info)
        students = {"student": export_student(result, cfg, out, "student")}
        history = {"student": state["history"]}
        clock.lap("train")
        if cfg.run.compare_hard_labels:
            base, base_result = train_hard_label(cfg, store, info)
            history["hard_label"] = base["history"]
            students["hard_label_student"] = export_student(base_result, cfg, out, "hard_label_student")
            clock.lap("train_hard_label")
        if cfg.compare_single_teacher:  # the same student from one teacher alone (its pass over the others' rows first)
            name = cfg.compare_single_teacher
            passes += [p for p in [teachers.score_single(cfg, store, info.vocab_size, name, metrics)] if p]
            single, single_result = teachers.train_single_teacher(cfg, store, info.vocab_size, name)
            history[f"single_{name}"] = single["history"]
            students[f"single_{name}_student"] = export_student(single_result, cfg, out, f"single_{name}_student")
            clock.lap("train_single_teacher")
        wait_for_nodes(cfg, "eval")
        evaluation = add_answer_accuracy(cfg, store, students, evaluate_students(cfg, store, students))
        if cfg.teachers:  # the student against each teacher, on its own rows and on all rows
            evaluation["teachers"] = teachers.evaluate(cfg, store, students)
        clock.lap("eval")
        report = build_report(cfg, store, out_dir=out, phases=clock.phases, inputs=inputs, passes=passes,
                              state=state, total_steps=total, history=history, evaluation=evaluation,
                              students=students, refresh=refresh)
        report["files"] = write_report(out, report)
        return report
    finally:
        # Failed or not, the next job on this store need not wait for the lease to expire.
        store.release_lease()


class PhaseClock:
    """Wall seconds of each phase, in order: `lap(name)` closes the phase that just ended."""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(now - self._last, 3)
        self._last = now


# ------------------------------------------------------------------------------- the phases


def check_output_dir(cfg) -> None:
    """An unwritable output directory fails now, not after an hour of teacher passes."""
    d = output_dir(cfg)
    if "://" in d:
        return
    probe_dir = d
    while not os.path.exists(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    if not os.path.isdir(probe_dir) or not os.access(probe_dir, os.W_OK | os.X_OK):
        raise ConfigError([f"run.output_dir: cannot write to {d} ({probe_dir} is not a writable "
                           "directory) — choose a directory you can write, e.g. run.output_dir=runs/mine"])


def preflight(cfg):
    """All the checks that need no cluster; returns the models' info."""
    from .data import resolve_corpus
    from .models import preflight as check_models

    from .tasks import get_task

    check_output_dir(cfg)
    info = check_models(cfg)
    resolve_corpus(cfg.data)
    problems = get_task(cfg).preflight()
    if problems:
        raise ConfigError(problems)
    if cfg.teachers:
        from .teachers import preflight as check_teachers

        check_teachers(cfg, info)  # one vocabulary for every teacher; routing column and values
    return info


def teacher_configs(cfg) -> list:
    """The run's config once per teacher (`teachers.for_teacher`), or the run's config itself."""
    from .teachers import for_teacher, names

    return [for_teacher(cfg, n) for n in names(cfg)] if cfg.teachers else [cfg]


def open_store(cfg, info):
    from .store import SoftTargetStore
    from .teacher import target_params

    from .data import check_recorded_inputs

    store = SoftTargetStore.open(cfg.store_uri, tokenizer=info.tokenizer, targets=target_params(cfg.targets))
    # A store built from another corpus is refused before this run takes the lease: bad input leaves
    # the store as it was. Then one job per store; the run's actors commit under this handle's lease.
    check_recorded_inputs(cfg, store, info)
    store.acquire_lease(cfg.run.name)
    return store


def score_pending(cfg, store, info, metrics=None) -> dict | None:
    """Initial teacher pass: every shard with no valid current version for this teacher and format."""
    from .teacher import run_teacher_pass, target_params

    damaged = store.verify_all()
    for sid, reason in damaged.items():
        log(f"shard {sid} is damaged ({reason}); it will be re-scored")
        store.invalidate(sid, reason)
    pending = store.pending(info.teacher_rev, target_params(cfg.targets))
    if not pending:
        return None
    wait_for_nodes(cfg, "teacher")  # only now: nodes for a pass with nothing to score would idle
    log(f"teacher pass over {len(pending)} of {len(store.shard_ids())} shards")
    stats = run_teacher_pass(cfg, store, pending, vocab_size=info.vocab_size, teacher_rev=info.teacher_rev,
                             step=-1, source="initial", seed=cfg.run.seed, metrics=metrics)
    return dict(stats, damaged=damaged)  # {shard_id: reason}: reported in report.json's teacher_passes


def train_student(cfg, store, info) -> tuple[dict, int, dict | None, object]:
    """The distilled student, with the refresh scheduler beside it in mixed mode.

    Returns (final state, total steps, refresh status or None, the Ray Train result)."""
    from .train import fit_student, read_final_state

    wait_for_nodes(cfg, "train")
    sched, fit_kw, refresh = None, {}, None
    if cfg.mode == "mixed":  # the refresh scheduler actor re-scores a fraction of the shards as training goes
        from .refresh import finish_scheduler, fit_kwargs, scheduler_name, start_scheduler
        sched = start_scheduler(cfg, store, info, scheduler_name(cfg), NAMESPACE)
        fit_kw = fit_kwargs(cfg, scheduler_name(cfg), NAMESPACE)
    try:
        result, total = fit_student(cfg, store, info.vocab_size, label="student", **fit_kw)
    finally:
        if sched is not None:
            refresh = finish_scheduler(sched)  # waits for a pass in flight, then stops the actor
    if result.error:
        raise result.error
    return read_final_state(result), total, refresh, result


def train_hard_label(cfg, store, info) -> tuple[dict, object]:
    """The same student on hard labels alone (alpha 0), for comparison: (final state, result)."""
    from .train import fit_student, read_final_state

    result, _ = fit_student(cfg, store, info.vocab_size, label="hard_label", alpha=0.0)
    if result.error:
        raise result.error
    return read_final_state(result), result
