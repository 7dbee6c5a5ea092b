"""Student training with real Ray Train DDP (2 gloo workers on CPU) over a real store."""
from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pytest
import torch

from raydistill.data import build_inputs
from raydistill.export import export_student
from raydistill.models import build_student, preflight
from raydistill.pipeline import open_store, score_pending
from raydistill.train import fit_student, read_final_state

from test_teacher_pass import make_cfg

pytestmark = pytest.mark.slow


def train_cfg(tmp_path, tiny_dir, corpus, **over):
    # One teacher replica: these stores are a few shards, and the pool itself is tested in test_teacher_pass.
    base = dict(teacher__replicas=1, train__workers=2, train__cpus_per_worker=0.5, train__batch_size=16,
                train__epochs=2, train__lr=3e-3, train__warmup_steps=2, train__log_every=1,
                train__checkpoint_every=4, train__alpha=0.5, run__name=f"t{os.getpid()}-{tmp_path.name}")
    base.update(over)
    return make_cfg(tmp_path, tiny_dir, corpus, fmt="sampled", **base)


def prepared_store(cfg):
    info = preflight(cfg)
    store = open_store(cfg, info)
    build_inputs(cfg, store, info)
    score_pending(cfg, store, info)
    return info, store


def copied_store(base_uri: str, cfg):
    """(info, store) for `cfg` over a copy of the store at `base_uri` (the same data, teacher and targets
    settings): its inputs and initial pass are found, nothing is built or scored again."""
    shutil.copytree(base_uri, cfg.store_uri)
    info, store = prepared_store(cfg)
    assert all(store.current(s)["version"] == 1 for s in store.shard_ids())
    return info, store


@pytest.fixture(scope="module")
def base_store(ray_session, tmp_path_factory, tiny_dir, tiny_corpus):
    """Inputs and the teacher pass, built once for this module; each test trains on a copy."""
    _, store = prepared_store(train_cfg(tmp_path_factory.mktemp("train-base"), tiny_dir, tiny_corpus))
    return store.uri


def test_ddp_two_workers_disjoint_data_and_export(base_store, tmp_path, tiny_dir, tiny_corpus, monkeypatch):
    from transformers import AutoModelForCausalLM

    cfg = train_cfg(tmp_path, tiny_dir, tiny_corpus)
    info, store = copied_store(base_store, cfg)
    audit = tmp_path / "audit"
    monkeypatch.setenv("RAYDISTILL_AUDIT_DIR", str(audit))
    result, total = fit_student(cfg, store, info.vocab_size)
    assert result.error is None
    # Ray Train's own actors ran, but no DatasetManager: our workers read the store themselves
    # (raydistill.torch_trainer); every fit of this session so far ran on the same trainer class.
    import ray._private.state
    classes = {a["ActorClassName"] for a in ray._private.state.actors().values()}
    assert {"TrainController", "RayTrainWorker"} <= classes and "DatasetManager" not in classes, classes
    state = read_final_state(result)
    rows = sum(s["rows"] for s in store.manifest()["inputs"]["shards"].values())
    assert total == (rows // 2 // 16) * 2 and state["step"] == total

    losses = [h["loss"] for h in state["history"]]
    k = max(2, len(losses) // 4)
    assert np.mean(losses[-k:]) < np.mean(losses[:k]) - 0.05, losses

    for epoch in (0, 1):
        r0 = np.concatenate([np.load(f) for f in glob.glob(str(audit / f"student-rank0-epoch{epoch}-*.npy"))])
        r1 = np.concatenate([np.load(f) for f in glob.glob(str(audit / f"student-rank1-epoch{epoch}-*.npy"))])
        assert len(r0) == len(r1) == (total // 2) * 16       # equal split, whole batches
        assert len(np.unique(r0)) == len(r0) and len(np.unique(r1)) == len(r1)
        assert not set(r0.tolist()) & set(r1.tolist())      # disjoint ranks

    out = export_student(result, cfg, str(tmp_path / "out"), "student")
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    trained = build_student(cfg.student, cfg.teacher.model)
    from safetensors.torch import load_file
    with result.checkpoint.as_directory() as d:
        trained.load_state_dict(load_file(os.path.join(d, "model.safetensors")), strict=False)
    x = torch.randint(0, info.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(exported(input_ids=x).logits, trained.eval()(input_ids=x).logits, atol=1e-5)
    untrained = build_student(cfg.student, cfg.teacher.model, seed=123)
    with torch.no_grad():
        assert not torch.allclose(exported(input_ids=x).logits, untrained(input_ids=x).logits, atol=1e-3)


def test_worker_killed_resumes_from_checkpoint(base_store, tmp_path, tiny_dir, tiny_corpus, monkeypatch):
    cfg = train_cfg(tmp_path, tiny_dir, tiny_corpus, train__max_failures=2, train__epochs=1)
    info, store = copied_store(base_store, cfg)
    marker = tmp_path / "killed"
    monkeypatch.setenv("RAYDISTILL_KILL_AT_STEP", "6")
    monkeypatch.setenv("RAYDISTILL_KILL_RANK", "1")
    monkeypatch.setenv("RAYDISTILL_KILL_MARKER", str(marker))
    result, total = fit_student(cfg, store, info.vocab_size)
    assert marker.exists()                               # the worker process really died at step 6
    assert result.error is None
    state = read_final_state(result)
    assert state["step"] == total                        # finished at the configured step count
    assert state["resumed_from"] == 4                    # from the last checkpoint before the kill
    assert 6 - state["resumed_from"] <= cfg.train.checkpoint_every


def plain_loop_losses(cfg, store, order: np.ndarray, total: int) -> list[float]:
    """The losses of a plain torch loop over the store's rows in `order` (batches of train.batch_size):
    the same student init, AdamW + warmup/cosine LR, clipping and `distill_loss` as the trainer."""
    import pyarrow as pa

    from raydistill.config import warmup_steps_for
    from raydistill.losses import distill_loss
    from raydistill.targets import decode
    from raydistill.train import lr_lambda

    t = cfg.train
    table = pa.concat_tables([store.read_shard(s) for s in store.shard_ids()])
    row_of = {int(s): i for i, s in enumerate(table["seq_id"].to_numpy())}
    torch.manual_seed(cfg.run.seed)
    model = build_student(cfg.student, cfg.teacher.model, seed=cfg.run.seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup_steps_for(t, total), total))
    losses = []
    for lo in range(0, len(order), t.batch_size):
        input_ids, targets = decode(table.take([row_of[int(s)] for s in order[lo:lo + t.batch_size]]),
                                    cfg.targets.format)
        loss, _ = distill_loss(model(input_ids=input_ids).logits[:, :-1], targets, input_ids[:, 1:],
                               alpha=t.alpha, temperature=t.temperature, loss=t.loss, jsd_beta=t.jsd_beta)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def test_trainer_matches_a_plain_loop_and_resume_names_changed_settings(base_store, tmp_path, tiny_dir,
                                                                        tiny_corpus, monkeypatch):
    """The staged trainer's losses equal a plain torch loop's over the same rows in the same order
    (from the seq_id audit). Then a re-run of the same run name resumes from its checkpoint; the
    settings that change the result (here the seed and the total steps) are named in the log and
    recorded in state.json."""
    cfg = train_cfg(tmp_path, tiny_dir, tiny_corpus, train__workers=1, train__epochs=1, train__max_steps=2,
                    train__checkpoint_every=2)
    info, store = copied_store(base_store, cfg)
    audit = tmp_path / "audit"
    monkeypatch.setenv("RAYDISTILL_AUDIT_DIR", str(audit))
    first, total = fit_student(cfg, store, info.vocab_size)
    monkeypatch.delenv("RAYDISTILL_AUDIT_DIR")
    assert first.error is None and total == 2
    state = read_final_state(first)
    assert state["step"] == 2 and state["resumed_from"] is None and state["config_changes"] == {}
    order = np.concatenate([np.load(f) for f in sorted(glob.glob(str(audit / "student-rank0-epoch0-*.npy")))])
    assert len(order) == 2 * 16
    want = plain_loop_losses(cfg, store, order, total)
    got = [h["loss"] for h in state["history"]]
    assert np.allclose(got, want, rtol=1e-4, atol=1e-5), (got, want)
    assert state["result_keys"] == {"run.seed": 0, "train.loss": "forward_kl", "train.alpha": 0.5,
                                    "total_steps": 2, "targets.format": "sampled", "task": "causal_lm"}

    again = train_cfg(tmp_path, tiny_dir, tiny_corpus, train__workers=1, train__epochs=1, train__max_steps=4,
                      train__checkpoint_every=2, run__seed=1)
    assert again.run.name == cfg.run.name
    second, total = fit_student(again, store, info.vocab_size)
    assert second.error is None and total == 4
    state = read_final_state(second)
    assert state["resumed_from"] == 2 and state["step"] == 4
    assert state["config_changes"] == {"run.seed": [0, 1], "total_steps": [2, 4]}
    assert [h["step"] for h in state["history"]] == [1, 2, 3, 4]

