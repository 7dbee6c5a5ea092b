"""What one refresh pass produces (`refresh.source`), run on the scheduler's long-lived pool:

- `teacher`: the same inputs re-scored; the teacher revision is re-read at every pass
  (`models.model_revision`), so a new checkpoint written at `teacher.model` is picked up.
- `resample`: a fresh `sampled` draw (a new seed per pass). With `targets.format=topk` the
  teacher is deterministic and a resample re-scores identically: it only costs compute.
- `on_policy`: the latest student continues the shards' prompts (`on_policy.py`), the teacher
  scores the continuations, and the rows carry the student's step as `policy_version`.
"""
from __future__ import annotations


def pass_seed(cfg, step: int) -> int:
    """`resample` draws anew at every pass; the other sources keep the run's seed."""
    r = cfg.refresh
    if r.source == "resample":
        return (r.seed * 1_000_003 + int(step) * 7919 + 1) & 0x7FFFFFFF
    return cfg.run.seed


def teacher_pass(cfg, store, decision, on_commit, *, pool_for, vocab_size: int, policy_dir: str | None,
                 metrics=None) -> dict:
    """Score `decision.shard_ids` on `pool_for(teacher_rev)` and commit each shard as it lands
    (`on_commit(shard_id, record)`); returns the pass's stats."""
    from ..models import model_revision
    from ..teacher import run_teacher_pass
    from .on_policy import generate_policy_inputs, prune_policy_inputs

    r = cfg.refresh
    if cfg.teachers:  # several teachers: each shard re-scored by its teacher(s) on their pools, then re-mixed
        from ..teachers import refresh_pass

        return refresh_pass(cfg, store, decision, on_commit, pool_for=pool_for, vocab_size=vocab_size,
                            seed=pass_seed(cfg, decision.step), metrics=metrics)
    teacher_rev = model_revision(cfg.teacher.model, cfg.teacher.revision)  # a new checkpoint → new rev
    inputs, policy_version, extra = None, -1, {}
    if r.source == "on_policy":
        gen = generate_policy_inputs(cfg, store, list(decision.shard_ids), policy_dir, step=decision.step,
                                     vocab_size=vocab_size)
        inputs, policy_version = gen["inputs"], gen["policy_version"]
        extra = {"policy_version": policy_version, "generated_tokens": gen["tokens"]}
    stats = run_teacher_pass(cfg, store, list(decision.shard_ids), vocab_size=vocab_size, teacher_rev=teacher_rev,
                             step=decision.step, source=r.source, seed=pass_seed(cfg, decision.step),
                             inputs=inputs, policy_version=policy_version, max_replicas=r.max_replicas,
                             metrics=metrics, on_commit=on_commit, pool=pool_for(teacher_rev))
    if inputs:
        prune_policy_inputs(store, list(inputs))
    return dict(stats, teacher_rev=teacher_rev, **extra)
