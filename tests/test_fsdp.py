"""`train.strategy: fsdp` with real Ray Train (2 gloo workers on CPU), a tiny Llama student and a real store.

One store, two fits of 2 micro-batches per step (`train.grad_accum=2`: gradients reduced on the
second only), module-scoped and asserted on by several tests:
  ddp   the reference run;
  fsdp  the same config sharded with torch FSDP2, and rank 1 killed after the second step of epoch 2
        (the checkpoint at the end of epoch 1 is the one it resumes from).
Both use the fused LM head + loss (`train.fused_loss=true`, chunks of 16 tokens), so the fused path is
checked under FSDP too (its head weight is the one FSDP gathered for the root's forward).

Ray Data does not promise the same row order in two fits, so each run is compared with the data-parallel
arithmetic over *its own* rows (the seq_id audit): a plain torch loop whose step is the mean of the two
ranks' losses (what DDP's gradient all-reduce computes), logging rank 0's loss. Tolerance: rtol 1e-5 on
every logged loss (float32: the ranks' gradients are reduced in another order and the fused loss sums its
chunks; measured at most 3.5e-7 over 12 steps of 2 micro-batches, DDP and FSDP alike, on the shared
2-core machine).
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch

from raydistill.config import load_config
from raydistill.errors import ConfigError
from raydistill.models import build_student
from raydistill.pipeline import export_student
from raydistill.train import fit_student, plan_steps, read_final_state

from test_config import VALID
from test_train import prepared_store, train_cfg

RTOL = 1e-5


# ---------------------------------------------------------------- config (no Ray)

def test_strategy_values_are_checked():
    with pytest.raises(ConfigError) as info:
        load_config(base=VALID, overrides=["train.strategy=zero"])
    msg = [e for e in info.value.errors if e.startswith("train.strategy:")]
    assert len(msg) == 1 and "ddp, fsdp" in msg[0] and "did you mean" not in msg[0], info.value.errors
    with pytest.raises(ConfigError) as info:
        load_config(base=VALID, overrides=["train.strategy=fsdp2"])
    assert any(e.startswith("train.strategy:") and "'fsdp'" in e for e in info.value.errors)
    assert load_config(base=VALID).train.strategy == "ddp"
    assert load_config(base=VALID, overrides=["train.strategy=fsdp"]).train.strategy == "fsdp"
    with pytest.raises(ConfigError, match="train.strategy: fsdp cannot yet write the on-policy student"):
        load_config(base=VALID, overrides=["train.strategy=fsdp", "refresh.source=on_policy",
                                           "refresh.policy=round_robin", "refresh.fraction=0.5"])


# ---------------------------------------------------------------- the two fits

def _cfg(tmp, tiny_dir, corpus, strategy, **over):
    return train_cfg(tmp, tiny_dir, corpus, run__name=f"fsdp{os.getpid()}-{strategy}", train__strategy=strategy,
                     train__batch_size=16, train__epochs=2, train__fused_loss="true", train__loss_chunk_tokens=16,
                     train__max_failures=2, train__grad_accum=2, family="llama", **over)


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory, tiny_dir, tiny_corpus):
    tmp = tmp_path_factory.mktemp("fsdp")
    cfg = _cfg(tmp, tiny_dir, tiny_corpus, "ddp")
    info, store = prepared_store(cfg)
    rows = sum(s["rows"] for s in store.manifest()["inputs"]["shards"].values())
    per_epoch, total = plan_steps(cfg, rows)
    out = {"store": store, "info": info, "per_epoch": per_epoch, "total": total, "tmp": tmp}
    for strategy in ("ddp", "fsdp"):
        c = _cfg(tmp, tiny_dir, tiny_corpus, strategy, train__checkpoint_every=per_epoch)
        audit = tmp / f"audit-{strategy}"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAYDISTILL_AUDIT_DIR", str(audit))
            if strategy == "fsdp":  # rank 1 dies once, after step per_epoch + 2
                mp.setenv("RAYDISTILL_KILL_AT_STEP", str(per_epoch + 2))
                mp.setenv("RAYDISTILL_KILL_RANK", "1")
                mp.setenv("RAYDISTILL_KILL_MARKER", str(tmp / "killed"))
            result, fit_total = fit_student(c, store, info.vocab_size)
        assert fit_total == total
        out[strategy] = {"cfg": c, "result": result, "audit": audit}
    return out


def _order(audit, rank: int) -> np.ndarray:
    """The seq_ids rank `rank` trained on, in order: epoch files in epoch order."""
    parts = []
    for epoch in range(2):
        files = sorted(glob.glob(str(audit / f"student-rank{rank}-epoch{epoch}-*.npy")))
        assert len(files) == 1, files  # one epoch file per rank: a killed attempt saves none mid-epoch
        parts.append(np.load(files[0]))
    return np.concatenate(parts)


def data_parallel_losses(cfg, store, orders, total: int) -> list[float]:
    """Rank 0's loss at each step of a 2-rank data-parallel run over `orders` ([rank0 ids, rank1 ids]):
    one model, each step's gradient that of the mean of the two ranks' losses summed over grad_accum
    micro-batches / grad_accum, AdamW + warmup/cosine, clipping and `distill_loss` on full logits as
    the trainer; logged: rank 0's loss on the step's last micro-batch."""
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
    logged = []
    for step in range(total):
        for micro in range(step * t.grad_accum, (step + 1) * t.grad_accum):
            losses = []
            for ids in orders:
                batch = ids[micro * t.batch_size:(micro + 1) * t.batch_size]
                input_ids, targets = decode(table.take([row_of[int(s)] for s in batch]), cfg.targets.format)
                losses.append(distill_loss(model(input_ids=input_ids).logits[:, :-1], targets,
                                           input_ids[:, 1:], alpha=t.alpha, temperature=t.temperature,
                                           loss=t.loss, jsd_beta=t.jsd_beta)[0])
            (sum(losses) / len(losses) / t.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        logged.append(losses[0].item())
    return logged


@pytest.mark.slow
def test_fsdp_loss_equals_the_data_parallel_run(runs):
    """Both fits' logged losses equal the data-parallel arithmetic over their own rows (rtol 1e-5), and,
    where Ray Data gave both fits the same rows in the same order, each other's."""
    got = {}
    for strategy in ("ddp", "fsdp"):
        run = runs[strategy]
        assert run["result"].error is None, run["result"].error
        state = read_final_state(run["result"])
        assert state["step"] == runs["total"] and state["strategy"] == strategy
        assert [h["step"] for h in state["history"]] == list(range(1, runs["total"] + 1))
        orders = [_order(run["audit"], r) for r in (0, 1)]
        assert all(len(o) == runs["total"] * 16 * 2 for o in orders)  # 2 micro-batches of 16 per step
        epoch0 = [set(o[: runs["per_epoch"] * 16 * 2].tolist()) for o in orders]
        assert not epoch0[0] & epoch0[1]  # disjoint ranks
        want = data_parallel_losses(run["cfg"], runs["store"], orders, runs["total"])
        got[strategy] = ([h["loss"] for h in state["history"]], orders)
        np.testing.assert_allclose(got[strategy][0], want, rtol=RTOL, err_msg=strategy)
    losses = got["fsdp"][0]
    k = max(2, len(losses) // 4)
    assert np.mean(losses[-k:]) < np.mean(losses[:k]) - 0.05, losses  # it learns
    if all((a == b).all() for a, b in zip(got["ddp"][1], got["fsdp"][1])):
        np.testing.assert_allclose(got["fsdp"][0], got["ddp"][0], rtol=RTOL)


@pytest.mark.slow
def test_fsdp_shards_the_parameters(runs):
    """Each rank holds about half of the parameter elements (FSDP2 shards dim 0, padding the last rank)."""
    facts = [json.loads((runs["fsdp"]["audit"] / f"student-rank{r}-params.json").read_text()) for r in (0, 1)]
    total = facts[0]["total"]
    assert facts[1]["total"] == total and all(f["strategy"] == "fsdp" for f in facts)
    assert facts[0]["local"] + facts[1]["local"] == total
    assert all(abs(f["local"] - total / 2) <= 0.05 * total for f in facts), facts
    ddp = [json.loads((runs["ddp"]["audit"] / f"student-rank{r}-params.json").read_text()) for r in (0, 1)]
    assert all(f["local"] == f["total"] == total for f in ddp)  # DDP: a whole copy per rank


@pytest.mark.slow
def test_fsdp_kill_resumes_at_the_recorded_step(runs):
    """Rank 1 died after step per_epoch + 2; the group restarted from the checkpoint at per_epoch (the
    losses after it equal the uninterrupted arithmetic: test_fsdp_loss_equals_the_data_parallel_run)."""
    assert (runs["tmp"] / "killed").exists()
    state = read_final_state(runs["fsdp"]["result"])
    assert state["resumed_from"] == runs["per_epoch"]
    assert state["step"] == runs["total"]


@pytest.mark.slow
def test_fsdp_export_loads_and_matches_the_trained_weights(runs):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = runs["fsdp"]
    cfg, result = run["cfg"], run["result"]
    out = export_student(result, cfg, str(runs["tmp"] / "out-fsdp"), "student")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]  # not FSDP's wrapper class
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    with result.checkpoint.as_directory() as d:
        weights = load_file(os.path.join(d, "model.safetensors"))
    exported_sd = exported.state_dict()
    assert set(weights) == set(exported_sd)
    for k, v in weights.items():
        assert torch.equal(exported_sd[k], v), k
    untrained = build_student(cfg.student, cfg.teacher.model, seed=cfg.run.seed)
    x = torch.randint(0, runs["info"].vocab_size, (2, 16))
    with torch.no_grad():
        assert not torch.allclose(exported(input_ids=x).logits, untrained.eval()(input_ids=x).logits, atol=1e-3)
