"""LR warmup as a share of the run (issue 12, item 9): train.warmup_ratio, train.warmup_steps wins."""
from __future__ import annotations

import pytest

from raydistill.config import TrainConfig, load_config, warmup_steps_for
from raydistill.errors import ConfigError


def test_warmup_ratio_scales_with_the_run():
    t = TrainConfig()
    assert t.warmup_steps is None and t.warmup_ratio == 0.03
    # a 40-step run warms up for 2 steps (10 fixed steps were a quarter of it); a long one for 3%
    assert [warmup_steps_for(t, n) for n in (0, 1, 40, 1000, 100_000)] == [0, 1, 2, 30, 3000]
    assert warmup_steps_for(TrainConfig(warmup_ratio=0.0), 500) == 0


def test_warmup_steps_wins_over_the_ratio():
    assert warmup_steps_for(TrainConfig(warmup_steps=7, warmup_ratio=0.5), 1000) == 7
    assert warmup_steps_for(TrainConfig(warmup_steps=0), 1000) == 0


def test_bad_warmup_values_name_the_key(tmp_path):
    (tmp_path / "m").mkdir()
    base = [f"teacher.model={tmp_path / 'm'}", "student.init_from_teacher={n_layer: 1}"]
    with pytest.raises(ConfigError, match="train.warmup_ratio: 1.5 is outside"):
        load_config(overrides=[*base, "train.warmup_ratio=1.5"])
    with pytest.raises(ConfigError, match="train.warmup_steps: -1 is below 0"):
        load_config(overrides=[*base, "train.warmup_steps=-1"])
    assert load_config(overrides=[*base, "train.warmup_steps=5"]).train.warmup_steps == 5
