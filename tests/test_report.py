"""report: report.json round-trips, report.md carries the key figures, PNGs only where data exists."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from raydistill.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def full_report(out: str) -> dict:
    return {
        "run": {"name": "tiny-mixed", "mode": "mixed", "output_dir": out},
        "phases": {"data": 1.25, "teacher_initial": 10.5, "train": 42.0, "eval": 2.25},
        "teacher_passes": [
            {"source": "initial", "step": -1, "shards": 8, "rows": 256, "tokens": 16128,
             "seconds": 10.5, "rows_per_s": 24.38, "tokens_per_s": 1536.0},
            {"source": "teacher", "step": 20, "shards": 2, "rows": 64, "tokens": 4032,
             "seconds": 3.0, "rows_per_s": 21.33, "tokens_per_s": 1344.0},
            {"source": "teacher", "step": 40, "shards": 2, "rows": 64, "tokens": 4032,
             "seconds": 2.5},  # rates left out: computed from rows/tokens and seconds
        ],
        "store": {"bytes": 3_500_000, "tokens": 16128, "bytes_per_token": 217.01,
                  "format": "sampled", "shards": 8},
        "train": {"steps": 60, "tokens_per_s": 5210.7, "final_loss": 2.8731,
                  "resumed_from_step": None},
        "history": {
            "mixed": [{"step": s, "loss": 5.0 - 0.03 * s, "kd": 4.0 - 0.02 * s,
                       "ce": 5.5 - 0.03 * s, "tokens_per_s": 5000.0} for s in range(1, 61)],
            "cached": [{"step": s, "loss": 5.1 - 0.025 * s} for s in range(1, 61)],
        },
        "eval": {
            "student": {"ce": 3.1416, "kl_teacher_student": 0.4321, "top1_agreement": 0.6789,
                        "perplexity": 23.14},
            "teacher": {"ce": 2.7183, "perplexity": 15.15},
            "hard_label_student": {"ce": 3.5012, "kl_teacher_student": 0.8765,
                                   "top1_agreement": 0.5012, "perplexity": 33.15},
            "tokens": 4032,
        },
        "refresh": {"policy": "round_robin", "fraction": 0.25, "every_steps": 20,
                    "source": "teacher", "passes": 2, "rows_refreshed": 128,
                    "max_age_seen": 57, "bound_steps": 80},
        "ages": [{"step": s, "max_age": s % 80 + 1, "mean_age": (s % 80) / 2} for s in range(0, 61, 5)],
    }


def _assert_png(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, (path, len(data))


def test_full_report(tmp_path):
    out = str(tmp_path / "run")
    report = full_report(out)
    paths = write_report(out, report)

    assert set(paths) == {"report.json", "report.md", "loss.png", "staleness.png", "throughput.png"}
    for name, path in paths.items():
        assert os.path.isfile(path) and os.path.basename(path) == name
    with open(paths["report.json"]) as f:
        assert json.load(f) == report
    for name in ("loss.png", "staleness.png", "throughput.png"):
        _assert_png(paths[name])
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")], "temp files left behind"

    md = open(paths["report.md"], encoding="utf-8").read()
    for needle in (
        "tiny-mixed", "`mixed`",
        "| train | 42.0000 |", "| **total** | 56.0000 | 100.0% |",       # phases
        "1,536.0", "1,344.0", "| 1,612.8 |",                               # teacher tokens/s (last computed)
        "217.0100", "3,500,000 B (3.3 MiB)", "sampled",                    # store
        "| steps | 60 |", "5,210.7", "2.8731",                              # train
        "| metric | student | teacher | hard-label student |",
        "| cross-entropy (nats) | 3.1416 | 2.7183 | 3.5012 |",
        "| KL(teacher ‖ student) | 0.4321 | — | 0.8765 |",
        "| top-1 agreement with teacher | 0.6789 | — | 0.5012 |",
        "4,032 tokens",
        "round_robin", "| refresh passes | 2 |", "| max shard age seen | 57 |",
        "within the bound of 80 steps",
        "![loss](loss.png)", "![staleness](staleness.png)", "![throughput](throughput.png)",
    ):
        assert needle in md, needle
    assert "resumed from step" not in md   # None is left out


def test_minimal_report(tmp_path):
    out = str(tmp_path / "minimal")
    report = {"run": {"name": "only-run"}}
    paths = write_report(out, report)
    assert set(paths) == {"report.json", "report.md"}
    assert json.load(open(paths["report.json"])) == report
    md = open(paths["report.md"], encoding="utf-8").read()
    assert "only-run" in md and "![" not in md and "## " not in md
    assert not any(n.endswith(".png") for n in os.listdir(out))


def test_empty_or_partial_data_skips_plots(tmp_path):
    out = str(tmp_path / "partial")
    report = {
        "run": {"name": "partial", "mode": "cached"},
        "history": {"cached": []},                       # empty series → no loss plot
        "ages": [{"step": 3}],                           # no age values → no staleness plot
        "teacher_passes": [{"source": "initial", "rows": 10}],  # no rate, no seconds → no bars
        "eval": {"student": {"ce": 4.5, "perplexity": 90.0}},   # no teacher, no KL
        "refresh": {"policy": "none"},
    }
    paths = write_report(out, report)
    assert set(paths) == {"report.json", "report.md"}
    md = open(paths["report.md"], encoding="utf-8").read()
    assert "| cross-entropy (nats) | 4.5000 |" in md and "KL(" not in md

    # A later write with data draws the plot; one without removes the stale PNG again.
    report["history"] = {"cached": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}]}
    paths = write_report(out, report)
    _assert_png(paths["loss.png"])
    report["history"] = {}
    paths = write_report(out, report)
    assert "loss.png" not in paths and not os.path.exists(os.path.join(out, "loss.png"))


def test_numpy_values_and_whole_evaluate_result(tmp_path):
    out = str(tmp_path / "np")
    ev = {"student": {"ce": 3.0, "kl_teacher_student": 0.25, "top1_agreement": 0.5, "perplexity": 20.09},
          "teacher": {"ce": 2.0, "perplexity": 7.39}, "tokens": 100}
    report = {"run": {"name": "np", "mode": "online"},
              "train": {"steps": np.int64(5), "final_loss": np.float32(1.5)},
              "eval": {"student": ev, "teacher": ev},   # whole evaluate() results are accepted
              "ages": [{"step": 1, "max_age": np.int64(2), "mean_age": np.float64(1.0)}]}
    paths = write_report(out, report)
    data = json.load(open(paths["report.json"]))
    assert data["train"] == {"steps": 5, "final_loss": 1.5}
    md = open(paths["report.md"], encoding="utf-8").read()
    assert "| cross-entropy (nats) | 3.0000 | 2.0000 |" in md and "100 tokens" in md
    _assert_png(paths["staleness.png"])   # no bound in the report: no line, still a plot


def test_requires_run(tmp_path):
    with pytest.raises(ValueError, match="'run'"):
        write_report(str(tmp_path), {"phases": {"a": 1.0}})
