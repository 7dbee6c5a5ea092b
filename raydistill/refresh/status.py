"""The refresh figures a report states, computed so that they never claim more than was seen.

`kept_up` is true only when every pass succeeded, none took longer than `every_steps`, training
never stalled for one and the scheduler saw every step; `effective_bound_steps` (the latency
formula of `policy.effective_bound`) is not claimed at all once a pass has failed — a failed
pass leaves its shards for a later one, and no closed formula then bounds their age; `bound_held`
compares the ages actually recorded with `max_age` (None when steps went unseen and none was over).
"""
from __future__ import annotations

from .policy import bound_steps, effective_bound


def max_latency(pass_log: list[dict]) -> int:
    """The slowest pass's latency in student steps (commit_step - start_step)."""
    return max((p["commit_step"] - p["start_step"] for p in pass_log), default=0)


def stall_share(stall_seconds: float, started_at: float | None, last_seen_at: float | None) -> float:
    """Share of the training wall time (first to last step the scheduler saw) spent waiting."""
    if started_at is None or last_seen_at is None or last_seen_at <= started_at:
        return 0.0
    return min(1.0, float(stall_seconds) / (last_seen_at - started_at))


def window_stall_share(pass_log: list[dict], n: int = 3) -> float:
    """Stall share over the last `n` passes: their stalls over the wall time they spanned."""
    recent = [p for p in pass_log if "started_at" in p and "ended_at" in p][-n:]
    if not recent:
        return 0.0
    span = recent[-1]["ended_at"] - recent[0]["started_at"]
    return min(1.0, sum(p.get("stall_s", 0.0) for p in recent) / span) if span > 0 else 0.0


def bound_figures(st, *, fraction: float, every: int, max_age: int | None, has_policy: bool) -> dict:
    """{bound_steps, max_age, max_latency_steps, effective_bound_steps, kept_up, bound_held, ...}
    of scheduler state `st` (a `SchedulerState`)."""
    latency = max_latency(st.pass_log)
    design = bound_steps(fraction, every) if has_policy else None
    effective = effective_bound(fraction, every, latency) if design is not None else None
    notes = []
    if st.failed_passes:
        notes.append(f"{st.failed_passes} failed pass(es)")
        effective = None
    if st.unseen_steps:
        notes.append(f"{st.unseen_steps} step(s) the scheduler never saw")
    if st.stall_steps:
        notes.append(f"training waited before {st.stall_steps} step(s)")
    if latency > every:
        notes.append(f"a pass took {latency} steps > every_steps {every}")
    seen = st.max_age_seen
    if max_age is None or seen is None:
        held = None
    elif seen > max_age:
        held = False
    else:
        held = None if st.unseen_steps else True
    return {"bound_steps": design, "max_age": max_age, "max_latency_steps": latency,
            "effective_bound_steps": effective, "kept_up": not notes, "bound_held": held,
            "not_kept_up_because": notes,
            "stall_seconds": round(st.stall_seconds, 3), "stall_steps": st.stall_steps,
            "stall_share": round(stall_share(st.stall_seconds, st.train_started_at, st.last_seen_at), 4),
            "unseen_steps": st.unseen_steps}


def teacher_compute(report_passes: list[dict], status: dict | None, *, online_tokens: int = 0) -> dict:
    """Teacher forward tokens of a run: initial pass(es), refresh passes, and the online baseline's
    forward inside every step."""
    initial = sum(int(p.get("tokens", 0)) for p in report_passes or [])
    refresh = int((status or {}).get("teacher_tokens", 0))
    return {"initial": initial, "refresh": refresh, "online": int(online_tokens),
            "total": initial + refresh + int(online_tokens)}
