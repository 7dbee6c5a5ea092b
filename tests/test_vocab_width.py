"""Teacher and student heads of different widths sharing one tokenizer (models.ModelInfo: W).

Real pairs often look like this (Qwen2.5-7B / -0.5B: 152,064 / 151,936 rows, 151,665 tokens): the
rows past the tokenizer are padding. Here tiny GPT-2s share one 320-token tokenizer with heads of
T, T + 32 and T + 64 rows (`resize_token_embeddings`: the extra rows are random like the others, so
a teacher that is *not* cut to W puts about a sixth of its mass there and every check below would
see it). Preflight accepts them (W = the narrowest head) and refuses a head narrower than the
tokenizer; the losses, the fused loss and evaluation with a student wider than W equal dense
references written here with the teacher's distribution softmax(logits[..., :W]); generation (the
teacher pass's generate_batch and replica, on-policy sampling) emits ids < W only, even from a teacher
whose padding rows win every argmax; one short `pipeline.run` (a teacher wider than the student, Ray)
stores only ids < W, and its first train step, its eval figures and an online step (train.online)
equal the same references.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

import tiny
from raydistill.config import load_config
from raydistill.errors import ModelError

PAD = 64


def _gpt2(path, tok, width: int, *, n_layer: int, n_embd: int, seed: int):
    model = tiny.make_gpt2(str(path), tok, n_layer=n_layer, n_embd=n_embd, seed=seed)
    if width != len(tok):
        torch.manual_seed(seed)
        model.resize_token_embeddings(width, mean_resizing=False)  # config.vocab_size = width
        model.save_pretrained(str(path))
    return model.eval()


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """{name: dir}: teachers T + 64 / T + 32, students T / T + 64, and a head of T - 8 (too narrow)."""
    root = tmp_path_factory.mktemp("widths")
    tok = tiny.make_tokenizer(str(root / "tok"))
    t = len(tok)
    specs = {"teacher_wide": (t + PAD, 2, 32, 1), "teacher_mid": (t + 32, 2, 32, 4),
             "student": (t, 1, 16, 2), "student_wide": (t + PAD, 1, 16, 3), "narrow": (t - 8, 1, 16, 5)}
    for name, (width, n_layer, n_embd, seed) in specs.items():
        _gpt2(root / name, tok, width, n_layer=n_layer, n_embd=n_embd, seed=seed)
    return {"T": t, **{n: str(root / n) for n in specs}}


def _cfg(heads, corpus, out, *extra):
    return load_config(None, [f"teacher.model={heads['teacher_wide']}", f"student.model={heads['student']}",
                              "student.init_from_teacher=null", f"data.path={corpus}", "data.seq_len=16",
                              f"run.output_dir={out}", *extra])


def _model(path):
    from raydistill.models import load_causal_lm

    return load_causal_lm(path)


def _ids(t: int, shape=(3, 12), seed=0) -> torch.Tensor:
    return torch.randint(0, t, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- preflight

def test_same_tokenizer_different_widths_accepted(heads, tiny_corpus, tmp_path):
    from raydistill import pipeline

    t = heads["T"]
    info = pipeline.preflight(_cfg(heads, tiny_corpus, tmp_path))
    assert info.vocab_size == t and info.tokenizer["width"] == t and info.tokenizer["vocab_size"] == t
    # The student wider than the teacher: W is the teacher's head.
    info = pipeline.preflight(_cfg(heads, tiny_corpus, tmp_path, f"teacher.model={heads['teacher_mid']}",
                                   f"student.model={heads['student_wide']}"))
    assert info.vocab_size == t + 32
    # init_from_teacher: the student copies the teacher's head; targets.k is checked against W.
    info = pipeline.preflight(_cfg(heads, tiny_corpus, tmp_path, "student.model=null",
                                   "student.init_from_teacher={n_layer: 1}"))
    assert info.vocab_size == t + PAD
    with pytest.raises(ModelError, match=f"targets.k<={t}"):
        pipeline.preflight(_cfg(heads, tiny_corpus, tmp_path, "targets.format=topk", f"targets.k={t + 1}"))


def test_several_teachers_share_the_narrowest_head(heads, tiny_corpus, tmp_path):
    from raydistill import pipeline
    from raydistill.config import Config

    d = {"run": {"output_dir": str(tmp_path)}, "data": {"path": tiny_corpus, "seq_len": 16},
         "teachers": [{"name": "wide", "model": heads["teacher_wide"]}, {"name": "mid", "model": heads["teacher_mid"]}],
         "student": {"model": heads["student_wide"]}}
    info = pipeline.preflight(Config.from_dict(d))
    assert info.vocab_size == info.tokenizer["width"] == heads["T"] + 32
    d["teachers"][1]["model"] = heads["narrow"]
    with pytest.raises(Exception) as e:
        pipeline.preflight(Config.from_dict(d))
    assert "teachers[1].model" in str(e.value) and f"output layer of {heads['T'] - 8} rows" in str(e.value)


def test_online_reverse_kl_with_a_wider_student_refused(heads, tiny_corpus, tmp_path):
    from raydistill import pipeline

    cfg = _cfg(heads, tiny_corpus, tmp_path, f"teacher.model={heads['teacher_mid']}",
               f"student.model={heads['student_wide']}", "train.online=true", "train.loss=reverse_kl")
    with pytest.raises(ModelError, match="reverse_kl with train.online=true is infinite"):
        pipeline.preflight(cfg)


# ---------------------------------------------------------------- losses and eval, student wider than W

def _dense_reference(s_logits, t_lp, labels, *, alpha, loss):
    """alpha * D(p || q) + (1 - alpha) * CE, p = exp(t_lp) ([.., W], 0 beyond), q over the whole head."""
    lq = F.log_softmax(s_logits.double(), -1)
    p = F.pad(t_lp.double().exp(), (0, lq.shape[-1] - t_lp.shape[-1]))
    q = lq.exp()
    if loss == "forward_kl":
        d = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - lq), torch.zeros_like(p)).sum(-1)
    elif loss == "tvd":
        d = 0.5 * (p - q).abs().sum(-1)
    else:  # jsd, beta 0.5
        m = 0.5 * (p + q)
        kl = lambda a: torch.where(a > 0, a * (a.clamp_min(1e-300).log() - m.log()), torch.zeros_like(a)).sum(-1)
        d = 0.5 * kl(p) + 0.5 * kl(q)
    ce = -lq.gather(-1, labels[..., None]).squeeze(-1)
    return float(alpha * d.mean() + (1 - alpha) * ce.mean())


@pytest.mark.parametrize("loss", ["forward_kl", "jsd", "tvd"])
def test_dense_targets_narrower_than_the_student(heads, loss):
    """Online-style dense targets of W = T + 32 columns against a T + 64 student: plain and fused
    losses equal the dense reference (and each other's gradients); reverse KL is refused."""
    from raydistill.chunked_loss import fused_distill_loss, model_hidden
    from raydistill.losses import distill_loss
    from raydistill.targets import from_logits

    w = heads["T"] + 32
    teacher, student = _model(heads["teacher_mid"]), _model(heads["student_wide"])
    ids = _ids(heads["T"])
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits[:, :-1]
    assert t_logits.shape[-1] == w
    targets, labels = from_logits(t_logits), ids[:, 1:]
    s_logits = student(input_ids=ids).logits[:, :-1]
    assert s_logits.shape[-1] == heads["T"] + PAD
    got, _ = distill_loss(s_logits, targets, labels, alpha=0.7, loss=loss)
    ref = _dense_reference(s_logits.detach(), targets.logprobs, labels, alpha=0.7, loss=loss)
    assert abs(got.item() - ref) < 1e-5 * max(1.0, abs(ref)), (got.item(), ref)
    (g_plain,) = torch.autograd.grad(got, student.transformer.wte.weight)
    hidden, weight, bias = model_hidden(student, ids)
    fused, _ = fused_distill_loss(hidden[:, :-1], weight, targets, labels, bias=bias, alpha=0.7, loss=loss,
                                  chunk_tokens=7)
    assert abs(float(fused) - ref) < 1e-5 * max(1.0, abs(ref))
    (g_fused,) = torch.autograd.grad(fused, student.transformer.wte.weight)
    assert torch.allclose(g_fused, g_plain, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="reverse_kl"):
        distill_loss(s_logits, targets, labels, alpha=0.7, loss="reverse_kl")


def test_topk_targets_cut_to_w_and_a_wider_student(heads):
    """A teacher pass's topk targets from the T + 64 teacher cut to W = T (causal_lm.encode_targets):
    ids < W, the log-probs are the sliced distribution's, and with k = W (the whole support) the
    bucket KL of a T + 64 student — its padding mass in the tail bucket — is the dense KL."""
    from raydistill.losses import kd_loss
    from raydistill.targets import build_table, decode
    from raydistill.tasks import get_task

    t = heads["T"]
    teacher, student = _model(heads["teacher_wide"]), _model(heads["student_wide"])
    task = get_task(None)  # causal_lm
    ids = _ids(t, (4, 10), seed=1)
    with torch.no_grad():
        t_lp = F.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), -1)
        s_logits = student(input_ids=ids).logits[:, :-1]
    sliced = F.log_softmax(teacher(input_ids=ids).logits[:, :-1, :t].detach().float(), -1)
    assert float(t_lp[..., t:].exp().sum(-1).mean()) > 0.1  # the padding rows hold real mass uncut
    for k in (8, t):
        params = {"format": "topk", "k": k, "capture_temperature": 1.0}
        with torch.inference_mode():
            cols = task.encode_targets(teacher, {"input_ids": ids}, params=params, vocab_size=t, generator=None)
        table = build_table(cols, seq_id=np.arange(4), input_ids=ids.numpy(), policy_version=np.full(4, -1),
                            fmt="topk", vocab_size=t)
        _, tg = decode(table, "topk")
        assert int(tg.ids.max()) < t
        assert torch.allclose(tg.logprobs, sliced.gather(-1, tg.ids), atol=2e-2)  # float16 storage
    got = kd_loss(s_logits, tg, ids[:, 1:])
    dense = F.log_softmax(tg.logprobs.gather(-1, tg.ids.argsort(-1)).double(), -1)  # id order, renormalised
    ref = _dense_reference(s_logits, dense, ids[:, 1:], alpha=1.0, loss="forward_kl")
    assert abs(float(got) - ref) < 1e-4, (float(got), ref)


def _eval_reference(student, teacher, ids, width):
    with torch.no_grad():
        lq = F.log_softmax(student(input_ids=ids).logits[:, :-1].double(), -1)
        lp = F.log_softmax(teacher(input_ids=ids).logits[:, :-1, :width].double(), -1)
    kl = (lp.exp() * (lp - lq[..., :width])).sum(-1).mean()
    agree = (lq.argmax(-1) == lp.argmax(-1)).double().mean()
    t_ce = -lp.gather(-1, ids[:, 1:, None]).mean()
    return float(kl), float(agree), float(t_ce)


def test_evaluate_with_heads_of_three_widths(heads):
    """evaluate(): the teacher renormalised over its first W ids, the student over its whole head —
    by default W is the narrower head of the two; vocab_width gives the run's W."""
    from raydistill.evaluate import evaluate

    t = heads["T"]
    teacher, wide, narrow = _model(heads["teacher_wide"]), _model(heads["student_wide"]), _model(heads["student"])
    ids = _ids(t, (5, 14), seed=2)
    for student, width, given in ((narrow, t, None), (wide, t + PAD, None), (wide, t, t)):
        got = evaluate(student, teacher, ids, batch_size=2, chunk_tokens=9, vocab_width=given)
        kl, agree, t_ce = _eval_reference(student, teacher, ids, width)
        assert abs(got["student"]["kl_teacher_student"] - kl) < 1e-5 and got["student"]["top1_agreement"] == agree
        assert abs(got["teacher"]["ce"] - t_ce) < 1e-5


# ---------------------------------------------------------------- generation never emits ids >= W

@pytest.fixture(scope="module")
def padded_teacher(heads, tmp_path_factory):
    """The T + 64 teacher with its padding rows made to win every argmax: an untied head whose rows
    >= T read hidden[..., 0], which ln_f pins to 50 at every position (ids < T do not read it)."""
    from raydistill.models import load_tokenizer

    t, path = heads["T"], str(tmp_path_factory.mktemp("padded") / "teacher")
    model = _model(heads["teacher_wide"])
    with torch.no_grad():
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.clone())
        model.transformer.ln_f.weight[0], model.transformer.ln_f.bias[0] = 0.0, 50.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[t:, 0] = 1.0
    model.save_pretrained(path)
    load_tokenizer(heads["teacher_wide"]).save_pretrained(path)
    return path


def _greedy_reference(model, prompts: torch.Tensor, n_new: int, width: int, eos: int) -> list[list[int]]:
    """Greedy decoding over logits[..., :width], a full forward per token (no cache), cut after EOS."""
    ids = prompts
    with torch.no_grad():
        for _ in range(n_new):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1, :width].argmax(-1, keepdim=True)], 1)
    rows = ids[:, prompts.shape[1]:].tolist()
    return [r[: r.index(eos) + 1] if eos in r else r for r in rows]


def test_generation_never_emits_padding_rows(heads, padded_teacher):
    """A teacher whose padding rows (ids >= W = T) win every argmax: the teacher generation pass's
    generate_batch and on-policy sampling (generation.sample) given W emit ids < W only — greedy equal
    to a reference argmax over logits[..., :W], sampled (top_p after the cut) and sampled from the
    cut distribution — while uncut they emit padding rows."""
    from raydistill.generate_pass import generate_batch
    from raydistill.generation import sample
    from raydistill.models import load_tokenizer

    t, new = heads["T"], 8
    model, eos = _model(padded_teacher), load_tokenizer(padded_teacher).eos_token_id
    ids = _ids(t, (4, 6), seed=3)
    with torch.no_grad():
        assert bool((model(input_ids=ids).logits.argmax(-1) >= t).all())  # padding wins everywhere uncut
    prompts, kw = ids.tolist(), dict(pad_id=eos, eos_id=eos, max_new_tokens=new)
    uncut = generate_batch(model, prompts, **kw)
    assert all(min(r) >= t for r in uncut), uncut
    greedy = generate_batch(model, prompts, **kw, vocab_size=t)
    assert greedy == _greedy_reference(model, ids, new, t, eos)
    assert max(map(max, greedy)) < t and sum(map(len, greedy)) == 4 * new  # no EOS cut these short
    drawn = generate_batch(model, prompts, **kw, vocab_size=t, temperature=1.0, top_p=0.9, num_return_sequences=2)
    assert len(drawn) == 8 and max(map(max, drawn)) < t and len({tuple(r) for r in drawn}) == 8

    got = sample(model, ids, new, torch.Generator().manual_seed(0), vocab_size=t)
    ref, gen = ids, torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(new):
            p = torch.softmax(model(input_ids=ref).logits[:, -1, :t].float(), -1)
            ref = torch.cat([ref, torch.multinomial(p, 1, generator=gen)], 1)
    assert torch.equal(got, ref) and int(got[:, 6:].max()) < t
    assert int((sample(model, ids, new, torch.Generator().manual_seed(0))[:, 6:] >= t).sum()) == 4 * new


def test_generate_replica_cuts_at_the_run_width(heads, padded_teacher, tiny_corpus, tmp_path):
    """GenerateReplica (the teacher generation pass's per-shard method, in-process: no Ray) generates
    with the run's W: a shard of 4 prompts gets the greedy reference responses, ids < W."""
    from raydistill.generate_pass import GenerateReplica, generated_rows, rows_table
    from raydistill.models import load_tokenizer
    from raydistill.store import SoftTargetStore
    from raydistill.tasks import get_task

    t = heads["T"]
    cfg = _cfg(heads, tiny_corpus, tmp_path / "out", f"teacher.model={padded_teacher}",
               "data.format=prompt_response", "data.prompt_column=question", "data.response_column=response",
               "generate.enabled=true", "generate.temperature=0", "generate.max_new_tokens=6", "teacher.batch_size=4")
    eos = load_tokenizer(padded_teacher).eos_token_id
    ids = _ids(t, (4, 6), seed=4)
    store = SoftTargetStore.open(str(tmp_path / "targets"), tokenizer={"vocab_size": t, "hash": "h"},
                                 targets={"format": "topk"})
    # A prompts file in the instruction-row contract: the prompt, then one response token (loss_mask 1).
    rows = generated_rows(ids.tolist(), [[eos]] * 4, np.arange(4), seq_len=16, pad_id=eos, num_return_sequences=1)
    written = store.write_file("inputs/train/s0.parquet", rows_table(rows, t, get_task(cfg).input_schema(t)))
    store.record_inputs({"s0": {"input": "inputs/train/s0.parquet", **{k: written[k] for k in
                                                                        ("rows", "checksum", "bytes")}}}, None, {})
    replica = GenerateReplica(config=cfg.to_dict(), vocab_size=t, store_uri=store.uri)
    out = replica.generate_shard("s0", "inputs/train/s0.parquet", 1, seed=0)
    table = store.read_input_file(out["input"])
    got = [row[6:n] for row, n in zip(table["input_ids"].to_pylist(), table["length"].to_pylist())]
    assert got == _greedy_reference(_model(padded_teacher), ids, 6, t, eos)
    assert out["tokens"] == 24 and max(map(max, got)) < t


# ---------------------------------------------------------------- a real run (Ray)

@pytest.mark.slow
def test_run_with_a_wider_teacher(ray_session, heads, tiny_corpus, tmp_path, monkeypatch):
    """pipeline.run: teacher T + 64 rows, student T (W = T), sampled targets. Every stored id is < W;
    the stored entropy and label log-probs are the sliced teacher's; the first train step's loss, the
    eval figures and an online step's loss equal dense references computed here with
    softmax(teacher logits[..., :W]) (the online fit: one step on the same store, ~20 s more)."""
    import dataclasses

    from raydistill import pipeline
    from raydistill.store import SoftTargetStore
    from raydistill.targets import decode
    from raydistill.train import fit_student, read_final_state

    t = heads["T"]
    monkeypatch.setenv("RAYDISTILL_AUDIT_DIR", str(tmp_path / "audit"))
    cfg = _cfg(heads, tiny_corpus, tmp_path / "out", "data.eval_fraction=0.1", "targets.samples=50",
               "targets.shard_rows=128", "teacher.replicas=1", "teacher.cpus_per_replica=0.5",
               "teacher.batch_size=32", "train.workers=1", "train.cpus_per_worker=0.5", "train.batch_size=8",
               "train.max_steps=2", "train.log_every=1", "train.checkpoint_every=2", "train.alpha=0.5",
               f"run.name=width-{os.getpid()}")
    report = pipeline.run(cfg)
    store = SoftTargetStore(cfg.store_uri)
    assert store.manifest()["tokenizer"]["width"] == t
    table = pa.concat_tables([store.read_shard(s) for s in store.shard_ids()])
    ids, targets = decode(table, "sampled")
    teacher, student = _model(heads["teacher_wide"]), _model(heads["student"])
    with torch.no_grad():
        full = F.log_softmax(teacher(input_ids=ids).logits[:, :-1].double(), -1)
        lp = F.log_softmax(teacher(input_ids=ids).logits[:, :-1, :t].double(), -1)
    real = targets.logprobs > float("-inf")
    assert int(targets.ids[real].max()) < t and bool((targets.ids[real] >= 0).all())
    assert float(full[..., t:].exp().sum(-1).mean()) > 0.1  # what an uncut teacher would have drawn from
    entropy = -(lp.exp() * lp).sum(-1)
    assert float((targets.entropy.double() - entropy).abs().max()) < 1e-2
    assert float((-(full.exp() * full).sum(-1) - entropy).mean()) > 0.1  # the uncut entropy: far off
    label_lp = lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert float((targets.label_logprob.double() - label_lp).abs().max()) < 2e-2

    # Step 1 (the untrained student, rows in the audited order): alpha * (CE_hat - H) + (1 - alpha) * CE,
    # with H the dense entropy of the sliced teacher.
    order = np.load(sorted(glob.glob(str(tmp_path / "audit" / "student-rank0-epoch0-*.npy")))[0])[:8]
    rows = [int(np.flatnonzero(table["seq_id"].to_numpy() == s)[0]) for s in order]
    with torch.no_grad():
        lq = F.log_softmax(student(input_ids=ids[rows]).logits[:, :-1].double(), -1)
    p_hat = targets.logprobs[rows].double().exp()  # counts / N, 0 on padding slots
    ce_hat = -(p_hat * lq.gather(-1, targets.ids[rows].long())).sum(-1)
    kd = (ce_hat - entropy[rows]).mean()
    ce = -lq.gather(-1, ids[rows, 1:, None]).mean()
    first = report["history"]["student"][0]
    assert first["step"] == 1 and abs(first["loss"] - float(0.5 * kd + 0.5 * ce)) < 3e-3, (first, kd, ce)

    ev, eval_ids = report["eval"], _eval_ids(store)
    kl, agree, t_ce = _eval_reference(_model(report["outputs"]["student"]), teacher, eval_ids, t)
    assert ev["eval_sequences"] == len(eval_ids) > 0
    assert abs(ev["student"]["kl_teacher_student"] - kl) < 1e-5
    # The trained student depends on the read order: allow one near-tie argmax (float32 vs float64).
    assert abs(ev["student"]["top1_agreement"] - agree) <= 1.0 / eval_ids[:, 1:].numel()
    assert abs(ev["teacher"]["ce"] - t_ce) < 1e-5

    # train.online: the teacher's T + 64 logits are cut to W inside the step; its first loss is the
    # exact dense one, alpha * KL(p_W || q) + (1 - alpha) * CE.
    online = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, online=True, max_steps=1,
                                                                checkpoint_every=1))
    result, _ = fit_student(online, store, t, label="online")
    assert result.error is None
    order = np.load(glob.glob(str(tmp_path / "audit" / "online-rank0-epoch0-*.npy"))[0])[:8]
    rows = [int(np.flatnonzero(table["seq_id"].to_numpy() == s)[0]) for s in order]
    with torch.no_grad():
        lq = F.log_softmax(student(input_ids=ids[rows]).logits[:, :-1].double(), -1)
    kl = (lp[rows].exp() * (lp[rows] - lq)).sum(-1).mean()
    ce = -lq.gather(-1, ids[rows, 1:, None]).mean()
    first = read_final_state(result)["history"][0]
    assert abs(first["loss"] - float(0.5 * kl + 0.5 * ce)) < 1e-4, (first, kl, ce)


def _eval_ids(store) -> torch.Tensor:
    from raydistill.evaluate import eval_input_ids

    return eval_input_ids(store.read_input_file(store.manifest()["inputs"]["eval"]), max_rows=512)
