"""Row 8: what the enforced staleness bound costs, and how a bigger refresh pool buys it back.

    python bench/run.py --quick --rows 8

One store (inputs + initial pass, built once), then Ray Train fits of the same student, interleaved
A B C A B C (`repeats` rounds) so that load drifting on a shared machine hits every arm alike:

  A  no refresh (refresh.policy none): the baseline training tokens/s
  B  round robin, fraction 0.25, every_steps 5, refresh.max_age 10 (half the round-robin figure
     of 20: every shard re-scored every 10 steps, a bound one replica cannot meet),
     refresh.enforce wait, a refresh pool of 1 replica
  C  the same with a pool of 2 replicas

Each refresh shard is slowed by RAYDISTILL_TEACHER_DELAY_S (`delay_s`), standing for a teacher
much larger than the student (on a separate node or GPU: the delay costs no CPU here, so the two
replicas do not fight the trainer for this machine's cores). Measured per fit: training tokens/s
(steady-state harmonic mean of the logged intervals, stalls included) and the stall share the
scheduler reports (seconds training waited / training wall time). The row states, per pool size,
the median over rounds of tokens/s(refresh) / tokens/s(no refresh), and the median stall share.
"""
from __future__ import annotations

import os
import statistics

from common import Row, bench_config, harmonic_mean, log


def _fit(cfg, store, info, details_runs: list, arm: str, namespace: str) -> dict:
    from raydistill.refresh import finish_scheduler, fit_kwargs, scheduler_name, start_scheduler
    from raydistill.train import fit_student, read_final_state

    sched, kw = None, {}
    if cfg.mode == "mixed":
        sched = start_scheduler(cfg, store, info, scheduler_name(cfg), namespace)
        kw = fit_kwargs(cfg, scheduler_name(cfg), namespace)
    try:
        result, _ = fit_student(cfg, store, info.vocab_size, **kw)
    finally:
        status = finish_scheduler(sched) if sched is not None else {}
    if result.error:
        raise result.error
    history = read_final_state(result)["history"]
    tps = harmonic_mean([h["tokens_per_s"] for h in history[1:]])
    run = {"arm": arm, "tokens_per_s": tps, "stall_share": status.get("stall_share", 0.0),
           "stall_seconds": status.get("stall_seconds", 0.0), "stall_steps": status.get("stall_steps", 0),
           "max_age_seen": status.get("max_age_seen"), "max_age": status.get("max_age"),
           "passes": status.get("passes"), "pool_replicas": status.get("pool_replicas")}
    details_runs.append(run)
    log(f"row 8 {arm}: {tps:,.0f} tok/s, stall share {run['stall_share']:.2f}, max age "
        f"{run['max_age_seen']} (bound {run['max_age']})")
    return run


def run_row_8(sizes, assets, work, details, *, repeats: int = 2, steps: int = 40, every: int = 5,
              max_age: int = 10, delay_s: float = 0.3) -> list[Row]:
    from raydistill.data import build_inputs
    from raydistill.models import preflight
    from raydistill.pipeline import open_store, score_pending

    import tempfile

    # Its own scratch: a bench started meanwhile clears bench/results/tmp/run-* (an earlier run's).
    out = tempfile.mkdtemp(prefix="raydistill-row8-")
    common = {"train.max_steps": steps, "train.epochs": 50, "train.log_every": 5, "teacher.replicas": 1,
              "teacher.cpus_per_replica": 0.25}
    arms = {
        "none": {},
        "pool1": {"refresh.policy": "round_robin", "refresh.fraction": 0.25, "refresh.every_steps": every,
                  "refresh.max_age": max_age, "refresh.source": "resample", "refresh.max_replicas": 1},
        "pool2": {"refresh.policy": "round_robin", "refresh.fraction": 0.25, "refresh.every_steps": every,
                  "refresh.max_age": max_age, "refresh.source": "resample", "refresh.max_replicas": 2,
                  "teacher.replicas": 2},
    }
    base = bench_config(sizes, teacher=assets["teacher"], corpus=assets["corpus"], out_dir=out, name="row8-init",
                        **common)
    info = preflight(base)
    store = open_store(base, info)
    build_inputs(base, store, info)
    score_pending(base, store, info)
    import shutil
    os.environ["RAYDISTILL_TEACHER_DELAY_S"] = str(delay_s)  # read on the driver, at each scheduler start
    runs: list = []
    details["row8"] = {"runs": runs, "repeats": repeats, "steps": steps, "every_steps": every, "max_age": max_age,
                       "delay_s": delay_s, "shards": len(store.shard_ids())}
    try:
        for rep in range(repeats):
            for arm, over in arms.items():
                cfg = bench_config(sizes, teacher=assets["teacher"], corpus=assets["corpus"], out_dir=out,
                                   name=f"row8-{arm}-{rep}", **{**common, **over})
                cfg.targets.store = os.path.join(out, cfg.run.name, "targets")  # every fit starts from
                shutil.copytree(store.uri, cfg.targets.store)                   # the initial pass's ages
                _fit(cfg, open_store(cfg, info), info, runs, arm, "raydistill-bench")
    finally:
        os.environ.pop("RAYDISTILL_TEACHER_DELAY_S", None)
        shutil.rmtree(out, ignore_errors=True)

    def by(arm, key):
        return [r[key] for r in runs if r["arm"] == arm]

    rows = []
    for arm, pool in (("pool1", 1), ("pool2", 2)):
        ratios = [b / a for a, b in zip(by("none", "tokens_per_s"), by(arm, "tokens_per_s"))]
        share = statistics.median(by(arm, "stall_share"))
        ratio = statistics.median(ratios)
        rows.append(Row("8", f"train tok/s with max_age={max_age} enforced, refresh pool {pool} "
                             f"(stall share {share:.2f})", statistics.median(by("none", "tokens_per_s")),
                        statistics.median(by(arm, "tokens_per_s")), "tok/s", ratio, "info", "info",
                        f"median of {repeats} interleaved rounds; ratios {[round(x, 2) for x in ratios]}; "
                        f"max age seen {max(by(arm, 'max_age_seen'))} (bound {max_age}); "
                        f"{details['row8']['shards']} shards, +{delay_s:g} s per refreshed shard"))
    return rows
