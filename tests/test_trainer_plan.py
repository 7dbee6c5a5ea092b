"""The trainer's plan and fault hooks as plain logic (no cluster): what a resume compares, and
how the env-var test hooks are read on the driver."""
from __future__ import annotations

import os

import pytest

from raydistill import faults
from raydistill.config import Config
from raydistill.train import TrainPlan, config_changes


def plan(**over) -> TrainPlan:
    cfg = Config().to_dict()
    kw = dict(config=cfg, alpha=0.5, label="student", reads="targets", total_steps=10, steps_per_epoch=5)
    kw.update(over)
    return TrainPlan(**kw)


def test_result_keys_and_changes():
    a = plan()
    assert a.result_keys() == {"run.seed": 0, "train.loss": "forward_kl", "train.alpha": 0.5, "total_steps": 10,
                               "targets.format": "sampled", "task": "causal_lm"}
    cfg = Config().to_dict()
    cfg["run"]["seed"], cfg["train"]["loss"], cfg["train"]["lr"] = 3, "jsd", 0.5   # lr does not count
    b = plan(config=cfg, alpha=0.0, total_steps=12)
    assert config_changes(a.result_keys(), b.result_keys()) == {
        "run.seed": [0, 3], "train.loss": ["forward_kl", "jsd"], "train.alpha": [0.5, 0.0], "total_steps": [10, 12]}
    assert config_changes(a.result_keys(), a.result_keys()) == {}
    assert config_changes({}, b.result_keys()) == {}   # a checkpoint that recorded none: nothing to compare


def test_plan_refuses_an_unknown_read():
    with pytest.raises(AssertionError):
        plan(reads="inputz")


def test_train_fault_from_env(monkeypatch, tmp_path):
    for k in ("RAYDISTILL_KILL_AT_STEP", "RAYDISTILL_KILL_RANK", "RAYDISTILL_KILL_MARKER"):
        monkeypatch.delenv(k, raising=False)
    assert faults.train_fault() is None
    monkeypatch.setenv("RAYDISTILL_KILL_AT_STEP", "6")
    assert faults.train_fault() is None                  # no marker: no kill
    monkeypatch.setenv("RAYDISTILL_KILL_MARKER", str(tmp_path / "m"))
    assert faults.train_fault() == {"step": 6, "rank": 0, "marker": str(tmp_path / "m")}
    monkeypatch.setenv("RAYDISTILL_KILL_RANK", "1")
    assert faults.train_fault()["rank"] == 1


def test_teacher_fault_from_env(monkeypatch, tmp_path):
    for k in ("RAYDISTILL_TEACHER_KILL_AT_SHARD", "RAYDISTILL_TEACHER_KILL_MARKER", "RAYDISTILL_TEACHER_KILL_WHEN",
              "RAYDISTILL_TEACHER_DELAY_S"):
        monkeypatch.delenv(k, raising=False)
    assert faults.teacher_fault() is None
    monkeypatch.setenv("RAYDISTILL_TEACHER_DELAY_S", "0.5")
    assert faults.teacher_fault() == {"delay_s": 0.5}
    monkeypatch.setenv("RAYDISTILL_TEACHER_KILL_AT_SHARD", "2")
    monkeypatch.setenv("RAYDISTILL_TEACHER_KILL_MARKER", str(tmp_path / "m"))
    assert faults.teacher_fault() == {"at": 2, "marker": str(tmp_path / "m"), "when": "after_write", "delay_s": 0.5}


def test_hooks_do_nothing_off_their_point(tmp_path):
    """Off the configured step / rank / shard / point nothing happens (the test process lives on)."""
    marker = str(tmp_path / "m")
    faults.at_train_step({"step": 3, "rank": 1, "marker": marker}, 2, 1)
    faults.at_train_step({"step": 3, "rank": 1, "marker": marker}, 3, 0)
    faults.at_teacher_shard({"at": 2, "marker": marker, "when": "after_write"}, "before_write", 2)
    faults.at_teacher_shard({"at": 2, "marker": marker, "when": "after_write"}, "after_write", 1)
    faults.at_train_step(None, 3, 1)
    faults.at_teacher_shard(None, "after_write", 2)
    faults.store_crash("after_rename")               # RAYDISTILL_FAULT unset
    assert not os.path.exists(marker)


def test_marker_is_claimed_once(tmp_path):
    marker = str(tmp_path / "m")
    assert faults._claim(marker) and not faults._claim(marker)
    assert open(marker).read() == str(os.getpid())


@pytest.mark.parametrize("rows,world", [([24] * 10, 2), ([24] * 3, 2), ([24, 24, 24, 7], 3), ([5, 40, 1, 33, 24], 4),
                                        ([10], 1), ([3, 3], 4)])
def test_rank_slices_split_the_rows_evenly_in_order(rows, world):
    """Every row once, ranks contiguous in manifest order, each rank at least N // world rows."""
    from raydistill.shard_reader import rank_slices

    shards = [(f"s{i:02d}", n) for i, n in enumerate(rows)]
    slices = rank_slices(shards, world)
    assert len(slices) == world
    seen = []
    for r, parts in enumerate(slices):
        mine = [(p["shard_id"], row) for p in parts for row in range(p["start"], p["stop"])]
        assert len(mine) in (sum(rows) // world, sum(rows) // world + 1), (r, len(mine))
        assert all(0 <= p["start"] < p["stop"] <= dict(shards)[p["shard_id"]] for p in parts)
        seen += mine
    assert seen == [(sid, row) for sid, n in shards for row in range(n)]  # in order, none twice, none left out


def test_epoch_slices_are_a_seeded_shuffle_of_whole_shards():
    """Each epoch its own shard order, the same for the same (seed, epoch); every row once."""
    from raydistill.shard_reader import epoch_slices

    shards = [(f"s{i:02d}", 24) for i in range(12)]
    order = lambda e, seed=0: [p["shard_id"] for parts in epoch_slices(shards, 2, seed, e) for p in parts]
    assert order(0) == order(0) and order(0) != order(1) and order(0) != order(0, seed=1)
    for e in range(3):
        assert sorted(order(e)) == [s for s, _ in shards]  # 12 shards of 24 rows over 2 ranks: whole shards
    assert order(0) != sorted(order(0))
    # each slice's rows get their own seed, the same for the same (seed, epoch)
    row_seeds = lambda e: [p["row_seed"] for parts in epoch_slices(shards, 2, 0, e) for p in parts]
    assert row_seeds(0) == row_seeds(0) and len(set(row_seeds(0))) == 12 and row_seeds(0) != row_seeds(1)
