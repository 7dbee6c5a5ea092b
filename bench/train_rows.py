"""Rows 3 and 4: student training from the store vs a plain loop, and cached vs online.

Row 3  one Ray Train worker (`train.workers=1`, `cpus_per_worker` = cores → torch threads = cores)
       reading the row-1 store through `raydistill.train.fit_student`, against a plain torch loop in
       this process with the same threads, the same student (`build_student`, same seed), the same
       optimizer step (AdamW + LambdaLR + grad clipping) and loss (`distill_loss`) over the same
       batches, decoded in memory beforehand. Steady state: the Ray run's logged `tokens_per_s`
       (tokens / time between two log lines) without the first `skip_logs` entries (start-up,
       first shard reads), combined as a median (robust to bursts of other people's load on a shared
       machine; the harmonic mean = total tokens / total time is in the JSON too); the plain loop:
       median step time, without its first (warm-up) step.
Row 3b the fixed cost of a fit: `fit_student` wall minus its steps at the plain loop's step time
       (what start-up, worker group, data pipeline start, checkpoint and shutdown add). A B A B:
       `sizes.fit_repeats` fits (the first is row 3's, the first fit of the Ray session, as a
       user's run pays it), each followed by a short plain loop whose median step prices that
       fit's steps; the ratio is plain e2e / fit wall, the median of the pairs. Target: <= 15 s.
Row 4  the same fit with `train.online=true` (teacher forward inside every step, dense targets).
       Time per epoch = epoch tokens / steady tokens/s; measured speed-up = online / cached.
       Theoretical = (t_teacher + t_student) / t_student from plain loops: t_teacher = teacher
       forward + `from_logits` per batch, t_student = the plain cached step of row 3.
"""
from __future__ import annotations

import os
import time

import numpy as np

from common import Row, Timer, bench_config, cores, harmonic_mean, judge, log, median


def store_batches(store, fmt: str, batch_size: int, limit: int) -> tuple[list, float]:
    """Decoded (input_ids, SparseTargets) batches of the store's current versions + decode s/batch."""
    import pyarrow as pa

    from raydistill.targets import decode

    table = pa.concat_tables([store.read_shard(sid) for sid in store.shard_ids()])
    out, t = [], Timer()
    for lo in range(0, table.num_rows - batch_size + 1, batch_size):
        out.append(decode(table.slice(lo, batch_size), fmt))
        if len(out) >= limit:
            break
    return out, t() / max(len(out), 1)


def _student(cfg, total_steps: int):
    import torch

    from raydistill.config import warmup_steps_for
    from raydistill.models import build_student
    from raydistill.train import lr_lambda

    torch.manual_seed(cfg.run.seed)
    model = build_student(cfg.student, cfg.teacher.model, seed=cfg.run.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup_steps_for(cfg.train, total_steps), total_steps))
    return model, opt, sched


def _step(cfg, model, opt, sched, input_ids, targets) -> float:
    """The body of `raydistill.train.train_loop`'s step (CPU: no autocast, grad_accum 1)."""
    import torch

    from raydistill.losses import distill_loss

    t = cfg.train
    labels = input_ids[:, 1:]
    logits = model(input_ids=input_ids).logits[:, :-1]
    loss, _ = distill_loss(logits, targets, labels, alpha=t.alpha, temperature=t.temperature, loss=t.loss,
                           jsd_beta=t.jsd_beta)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def plain_student_loop(cfg, batches, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    model, opt, sched = _student(cfg, steps)
    times = []
    for i in range(steps):
        input_ids, targets = batches[i % len(batches)]
        t = Timer()
        _step(cfg, model, opt, sched, input_ids, targets)
        times.append(t())
    tokens = batches[0][0].numel()
    steady = median(times[1:])  # median: robust to bursts of other load on a shared machine
    return {"steps": steps, "step_s_median": steady, "step_s_mean": sum(times[1:]) / (steps - 1),
            "tokens_per_step": tokens, "tokens_per_s": tokens / steady, "threads": threads}


def plain_online_loop(cfg, batches, steps: int, threads: int) -> dict:
    """t_teacher (forward + from_logits, as the online step does) and the whole plain online step."""
    import torch

    from raydistill.models import load_causal_lm
    from raydistill.targets import from_logits
    from raydistill.train import _clone_targets

    torch.set_num_threads(threads)
    teacher = load_causal_lm(cfg.teacher.model)
    model, opt, sched = _student(cfg, steps)
    t_teacher, t_step = [], []
    for i in range(steps):
        input_ids, _ = batches[i % len(batches)]
        t = Timer()
        with torch.inference_mode():
            targets = from_logits(teacher(input_ids=input_ids).logits[:, :-1].float(), input_ids[:, 1:])
        targets = _clone_targets(targets)
        t_teacher.append(t())
        _step(cfg, model, opt, sched, input_ids, targets)
        t_step.append(t())
    tokens = batches[0][0].numel()
    return {"t_teacher_s": median(t_teacher[1:]), "online_step_s": median(t_step[1:]),
            "tokens_per_s": tokens / median(t_step[1:])}


def ray_fit(cfg, store, vocab_size: int, skip_logs: int, profile: str | None = None, delay_s: float = 0.0) -> dict:
    from raydistill.train import fit_student, plan_steps, read_final_state

    prof = None
    if profile:
        from pyspy import Profile

        prof = Profile("RayTrainWorker", profile, delay_s=delay_s, duration_s=180)
        prof.__enter__()
    t = Timer()
    try:
        result, total = fit_student(cfg, store, vocab_size, label="bench")
    finally:
        if prof:
            prof.__exit__(None, None, None)
    wall = t()
    if result.error:
        raise result.error
    state = read_final_state(result)
    hist = state["history"]
    tps = [h["tokens_per_s"] for h in hist]
    rows = sum(s["rows"] for s in store.manifest()["inputs"]["shards"].values())
    steps_per_epoch, _ = plan_steps(cfg, rows)
    return {"wall_s": wall, "steps": state["step"], "total_steps": total, "history_tokens_per_s": tps,
            "steady_tokens_per_s": median(tps[skip_logs:]), "steady_harmonic_mean": harmonic_mean(tps[skip_logs:]),
            "steps_per_epoch": steps_per_epoch,
            "epoch_tokens": steps_per_epoch * cfg.train.batch_size * cfg.data.seq_len,
            "final_loss": hist[-1]["loss"] if hist else None,
            "profile": prof.summary if prof else None}


def run_rows_3_4(sizes, assets: dict, work: str, details: dict, store_uri: str, profile: bool = False) -> list[Row]:
    from raydistill.pipeline import open_store, preflight

    n = cores()
    stamp = time.strftime("%H%M%S")
    cfg = bench_config(sizes, teacher=assets["teacher"], corpus=assets["corpus"],
                       out_dir=os.path.join(work, "row3"), name=f"row3-{stamp}",
                       **{"targets.store": store_uri})
    info = preflight(cfg)
    store = open_store(cfg, info)
    batch_tokens = cfg.train.batch_size * cfg.data.seq_len

    log(f"row 3: Ray Train, 1 worker x {n} CPUs, {cfg.train.max_steps} steps from the store")
    prof_path = os.path.join(work, "profiles", "train_worker.txt") if profile else None
    cached = ray_fit(cfg, store, info.vocab_size, sizes.skip_logs, profile=prof_path, delay_s=0)
    if profile:
        details["profile_train_worker"] = cached.pop("profile")
    log(f"row 3: Ray steady {cached['steady_tokens_per_s']:,.0f} tok/s, wall {cached['wall_s']:.1f}s; plain loop next")
    t = Timer()
    batches, decode_s = store_batches(store, cfg.targets.format, cfg.train.batch_size, sizes.plain_steps)
    load_s = t()
    plain = plain_student_loop(cfg, batches, sizes.plain_steps, n)
    log(f"row 3: plain {plain['tokens_per_s']:,.0f} tok/s")

    fits = [{"wall_s": cached["wall_s"], "steps": cached["steps"], "plain_step_s": plain["step_s_median"]}]
    for i in range(1, sizes.fit_repeats):  # A B pairs: a fit, then the plain loop that prices its steps
        rcfg = bench_config(sizes, teacher=assets["teacher"], corpus=assets["corpus"],
                            out_dir=os.path.join(work, "row3"), name=f"row3b-{i}-{stamp}",
                            **{"targets.store": store_uri})
        again = ray_fit(rcfg, store, info.vocab_size, sizes.skip_logs)
        step_s = plain_student_loop(cfg, batches, max(4, sizes.plain_steps // 2), n)["step_s_median"]
        fits.append({"wall_s": again["wall_s"], "steps": again["steps"], "plain_step_s": step_s})
    for f in fits:
        f["fixed_s"] = f["wall_s"] - f["steps"] * f["plain_step_s"]
        f["ratio"] = (load_s + f["steps"] * f["plain_step_s"]) / f["wall_s"]
    log("row 3b: fits " + ", ".join(f"{f['wall_s']:.1f}s (fixed {f['fixed_s']:.1f}s)" for f in fits))

    ocfg = bench_config(sizes, teacher=assets["teacher"], corpus=assets["corpus"],
                        out_dir=os.path.join(work, "row4"), name=f"row4-{stamp}",
                        **{"targets.store": store_uri, "train.online": True})
    log("row 4: Ray Train online (teacher in the step)")
    online = ray_fit(ocfg, store, info.vocab_size, sizes.skip_logs)
    log(f"row 4: online steady {online['steady_tokens_per_s']:,.0f} tok/s; plain teacher loop next")
    plain_on = plain_online_loop(cfg, batches, max(4, sizes.plain_steps // 2), n)

    t_student = plain["step_s_median"]
    theory = (plain_on["t_teacher_s"] + t_student) / t_student
    epoch_cached = cached["epoch_tokens"] / cached["steady_tokens_per_s"]
    epoch_online = online["epoch_tokens"] / online["steady_tokens_per_s"]
    speedup = epoch_online / epoch_cached
    details["row3"] = {"ray": cached, "plain": plain, "decode_s_per_batch": decode_s,
                       "read_and_decode_s": load_s, "batch_tokens": batch_tokens, "fits": fits}
    details["row4"] = {"ray_online": online, "plain_online": plain_on, "t_student_s": t_student,
                       "theoretical": theory, "epoch_cached_s": epoch_cached, "epoch_online_s": epoch_online,
                       "plain_speedup": plain_on["online_step_s"] / t_student}

    ratio3 = cached["steady_tokens_per_s"] / plain["tokens_per_s"]
    ray_step = batch_tokens / cached["steady_tokens_per_s"]
    note3 = (f"step {ray_step * 1e3:.0f} ms (Ray) vs {t_student * 1e3:.0f} ms (plain); decode "
             f"{decode_s * 1e3:.0f} ms/batch of it; {len(cached['history_tokens_per_s']) - sizes.skip_logs} "
             f"log intervals of {cfg.train.log_every} steps")
    plain_e2e = load_s + cached["steps"] * t_student
    mid = sorted(fits, key=lambda f: f["ratio"])[len(fits) // 2]
    first_fixed = fits[0]["fixed_s"]
    rows = [
        Row("3", "train from store vs plain loop (steady)", plain["tokens_per_s"], cached["steady_tokens_per_s"],
            "tok/s", ratio3, ">= 0.85", judge(ratio3, ">=", 0.85), note3),
        Row("3b", "fit fixed cost (start-up, data start, checkpoint)", plain_e2e, first_fixed, "s", mid["ratio"],
            "fixed <= 15 s", "pass" if first_fixed <= 15.0 else "FAIL",
            f"first fit of the session: wall {cached['wall_s']:.1f}s for {cached['steps']} steps vs plain "
            f"read+decode+loop {plain_e2e:.1f}s; fixed cost per fit (wall - steps x plain step): " +
            ", ".join(f"{f['fixed_s']:.1f}s" for f in fits) + "; ratio = median of plain e2e / fit wall"),
        Row("4", "cached vs online: epoch speed-up", epoch_online, epoch_cached, "s/epoch", speedup,
            f">= 0.9 x theory {theory:.2f} = {0.9 * theory:.2f}", judge(speedup / theory, ">=", 0.9),
            f"speed-up {speedup:.2f} = {speedup / theory:.2f} of theoretical (t_teacher "
            f"{plain_on['t_teacher_s'] * 1e3:.0f} ms + t_student {t_student * 1e3:.0f} ms) / t_student; "
            f"plain online step {plain_on['online_step_s'] * 1e3:.0f} ms; fit_student walls (start-up incl.) "
            f"{cached['wall_s']:.0f}s cached vs {online['wall_s']:.0f}s online for {cached['steps']} steps"),
    ]
    return rows
