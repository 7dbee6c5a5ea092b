"""Shared fixtures: one local Ray per test session (on loopback), tiny real HF models on disk."""
from __future__ import annotations

import os
import sys

# Before Ray is imported anywhere: bind every Ray server to 127.0.0.1, no auth token, no telemetry.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train's preemption watcher (an extra actor process per fit, ~1.3 s of CPU each) reacts to node-drain
# notices, which no test sends: off for the suite's own fits and the drivers its tests start.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """One Ray start for the whole session; more logical CPUs than cores so passes + training fit."""
    import ray

    env = {"RAY_TRAIN_V2_ENABLED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for attempt in range(3):
        if ray.is_initialized():
            break
        try:
            ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
        except Exception as e:  # Ray waits a fixed 30 s for its raylet: a loaded machine can miss it
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tokenizer, GPT-2 teacher/student and a Llama teacher, saved like hub checkpoints."""
    root = tmp_path_factory.mktemp("models")
    tok = tiny.make_tokenizer(str(root / "tokenizer"))
    tiny.make_gpt2(str(root / "gpt2-teacher"), tok, n_layer=2, n_embd=32, seed=1)
    tiny.make_gpt2(str(root / "gpt2-student"), tok, n_layer=1, n_embd=16, seed=2)
    tiny.make_llama(str(root / "llama-teacher"), tok, n_layer=2, hidden=32, seed=3)
    return root


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return tiny.write_corpus(str(root / "corpus.parquet"), tiny.corpus_texts(200))


# The suite runs on two pytest-xdist workers (Makefile: -n 2 --dist loadfile --no-loadscope-reorder): a file
# is one unit of work, handed out in this order, so the longest files start first and the short ones fill
# in behind them. Per-file wall times of a serial run on a quiet 2-core machine (--durations, 2026-12-03),
# slowest first; unlisted files (seconds each) follow in collection order. (Alternating waiting and busy
# files instead made no difference: 1,099 s against 1,094 s for this order, fresh-clone .ci/run, single runs.)
SLOWEST_FIRST = [
    "test_refresh_ray.py",       # 302 s: bounded training runs beside a delayed refresh teacher (3 then, 2 now)
    "test_autoscaling.py",       # 126 s: own fake autoscaling cluster (runs beside the session's Ray)
    "test_rationale_e2e.py",     # 119 s: trains a teacher in the test, then two pipeline runs
    "test_train.py",             # 108 s
    "test_classification.py",    # 108 s
    "test_node_loss.py",         # 92 s: own multi-node cluster in a child process
    "test_job.py",               # 84 s: own head, driver SIGKILL and rerun
    "test_teachers_e2e.py",      # 63 s
    "test_generate.py",          # 60 s
    "test_teachers.py",          # 56 s
    "test_fsdp.py",              # 53 s
    "test_teacher_faults.py",    # 49 s
    "test_corrupt_shard.py",     # 38 s
    "test_instruct.py",          # 33 s
    "test_vocab_width.py",       # 31 s
    "test_teacher_pass.py",      # 20 s
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept
