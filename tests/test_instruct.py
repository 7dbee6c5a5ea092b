"""Instruction data (data.format chat / prompt_response): rendering, loss masks, targets only at loss
positions, losses and metrics that honour the mask, and one real-Ray teacher pass + fit."""
from __future__ import annotations

import glob

import numpy as np
import pyarrow as pa
import pytest
import torch

from raydistill import instruct
from raydistill.config import DataConfig, load_config
from raydistill.errors import ConfigError
from raydistill.targets import build_table, decode, encode

import tiny

CONVERSATIONS = [
    [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "on a mat"}],
    [{"role": "system", "content": "be red"}, {"role": "user", "content": "the cat sat"},
     {"role": "assistant", "content": "on a mat"}, {"role": "user", "content": "red"},
     {"role": "assistant", "content": "blue dog ran up"}],
    [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three four five six seven"}],
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny.make_tokenizer(str(tmp_path_factory.mktemp("tok")))


def runs(mask) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s."""
    m = np.r_[0, np.asarray(mask), 0]
    d = np.diff(m)
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


# ------------------------------------------------------------------------------ rendering

def test_chat_rendering_equals_apply_chat_template_and_masks_cover_the_responses(tok):
    for msgs in CONVERSATIONS:
        ids, mask = instruct.render_chat(tok, msgs, tiny.CHAT_TEMPLATE)
        assert ids == tok.apply_chat_template(msgs, chat_template=tiny.CHAT_TEMPLATE, tokenize=True,
                                              return_dict=False)
        # each run of the mask is exactly one assistant turn: its content and its end-of-turn token
        answers = [m["content"] + "<|endoftext|>" for m in msgs if m["role"] == "assistant"]
        assert [tok.decode(ids[a:b]) for a, b in runs(mask)] == answers
        # transformers' own assistant mask (a template with {% generation %} markers) agrees
        ref = tok.apply_chat_template(msgs, chat_template=tiny.CHAT_TEMPLATE_GENERATION, tokenize=True,
                                      return_dict=True, return_assistant_tokens_mask=True)
        ids_g, mask_g = instruct.render_chat(tok, msgs, tiny.CHAT_TEMPLATE_GENERATION)
        assert ids_g == ref["input_ids"] and mask_g == list(ref["assistant_masks"])

    cfg = DataConfig(format="chat", chat_template=tiny.CHAT_TEMPLATE, seq_len=96)
    rows = instruct.render_rows(tok, [{"messages": m} for m in CONVERSATIONS] + [{"messages": "not a list"}], cfg)
    assert rows["valid"].tolist() == [True, True, True, False]
    pad = tok.pad_token_id
    for i, msgs in enumerate(CONVERSATIONS):
        ids, mask = instruct.render_chat(tok, msgs, tiny.CHAT_TEMPLATE)
        n = len(ids)
        assert rows["length"][i] == n and rows["input_ids"][i, :n].tolist() == ids
        assert (rows["input_ids"][i, n:] == pad).all() and rows["loss_mask"][i].tolist() == mask + [0] * (96 - n)
    # the prompt a generation pass reads: the render up to the first answer, generation prompt included
    first = CONVERSATIONS[0][:1]
    assert instruct.prompt_ids(rows["input_ids"][0], rows["loss_mask"][0]) == tok.apply_chat_template(
        first, chat_template=tiny.CHAT_TEMPLATE, tokenize=True, add_generation_prompt=True, return_dict=False)


def test_prompt_response_rows_truncation_and_loss_on_all(tok):
    pairs = [("the cat sat", "on a mat"), ("one two three four five six seven eight", "nine ten"), ("red", "")]
    rows = [{"prompt": p, "response": r} for p, r in pairs]
    eos = tok.eos_token_id
    cfg = DataConfig(format="prompt_response", seq_len=12)
    out = instruct.render_rows(tok, rows, cfg)
    p = tok("the cat sat", add_special_tokens=False)["input_ids"]
    r = tok("on a mat", add_special_tokens=False)["input_ids"] + [eos]
    n = len(p) + len(r)
    assert out["input_ids"][0, :n].tolist() == p + r and out["length"][0] == n
    assert out["loss_mask"][0].tolist() == [0] * len(p) + [1] * len(r) + [0] * (12 - n)
    assert instruct.prompt_ids(out["input_ids"][0], out["loss_mask"][0]) == p
    # a long prompt: the response is cut off at seq_len; an empty response is no example
    p1 = tok(pairs[1][0], add_special_tokens=False)["input_ids"]
    assert len(p1) >= 12 and not out["valid"][1] and not out["valid"][2]
    all_ = instruct.render_rows(tok, rows, DataConfig(format="prompt_response", seq_len=12, loss_on="all"))
    assert all_["valid"].tolist() == [True, True, False]   # every token after the first carries loss
    assert all_["loss_mask"][0].tolist() == [0] + [1] * (n - 1) + [0] * (12 - n)
    assert all_["loss_mask"][1].tolist() == [0] + [1] * 11 and all_["length"][1] == 12


# ------------------------------------------------------------------------------ targets at loss positions

def _batch(tok, seq_len=24):
    cfg = DataConfig(format="chat", chat_template=tiny.CHAT_TEMPLATE, seq_len=seq_len)
    rows = instruct.render_rows(tok, [{"messages": m} for m in CONVERSATIONS[::2]], cfg)
    return torch.from_numpy(rows["input_ids"]), torch.from_numpy(rows["loss_mask"]), rows["length"]


@pytest.mark.parametrize("fmt", ["sampled", "topk"])
def test_targets_stored_only_at_loss_positions_and_decoded_in_place(tok, fmt):
    from raydistill.chunked_loss import encode_chunked

    ids, mask, length = _batch(tok)
    vocab = len(tok)
    torch.manual_seed(0)
    hidden, weight = torch.randn(*ids.shape, 8), torch.randn(vocab, 8)
    logits = hidden @ weight.T
    kw = dict(fmt=fmt, k=5, samples=30, vocab_size=vocab)
    pos = mask[:, 1:] != 0
    masked = encode(logits, ids, generator=torch.Generator().manual_seed(1), loss_mask=mask, **kw)
    full = encode(logits, ids, generator=torch.Generator().manual_seed(1), **kw)
    per_row = pos.sum(1).tolist()
    assert [len(a) for a in masked["label_logprob"]] == per_row
    # chunk by chunk (windows that cut sequences) gives the same columns
    chunked = encode_chunked(hidden, weight, ids, chunk_tokens=7, generator=torch.Generator().manual_seed(1),
                             loss_mask=mask, **kw)
    for col in (["topk_ids", "topk_logprobs", "tail_pow"] if fmt == "topk" else ["label_logprob", "entropy"]):
        assert all(np.array_equal(a, b) for a, b in zip(masked[col], chunked[col])), col

    enc = dict(masked, loss_mask=list(mask.numpy()), length=list(length))
    table = build_table(enc, seq_id=[0, 1], input_ids=ids, policy_version=-1, fmt=fmt, vocab_size=vocab)
    assert table.schema.names[-2:] == ["loss_mask", "length"]
    dense_table = build_table(full, seq_id=[0, 1], input_ids=ids, policy_version=-1, fmt=fmt, vocab_size=vocab)
    assert table.nbytes < dense_table.nbytes
    got_ids, got = decode(table, fmt)
    _, want = decode(dense_table, fmt)
    assert torch.equal(got_ids, ids) and got.logprobs.shape[:2] == pos.shape
    assert torch.equal(got.label_logprob[pos], want.label_logprob[pos])
    assert torch.isnan(got.label_logprob[~pos]).all()
    if fmt == "topk":  # the same top-k at every loss position
        assert torch.equal(got.ids[pos], want.ids[pos]) and torch.equal(got.logprobs[pos], want.logprobs[pos])
        assert torch.equal(got.tail_logmass[pos], want.tail_logmass[pos])
    else:  # draws: `samples` at each loss position, none stored elsewhere
        counts = torch.exp(got.logprobs[pos]).sum(-1)
        assert torch.allclose(counts, torch.ones_like(counts), atol=1e-5)
        assert sum(len(a) for a in masked["sample_len"]) == int(pos.sum())
        assert torch.equal(got.entropy[pos], want.entropy[pos])
    # a position with no target: a finite point mass, never read by a loss (its label is -100)
    assert (got.logprobs[~pos][:, 0] == 0).all() and torch.isneginf(got.logprobs[~pos][:, 1:]).all()
    bad = table.set_column(table.schema.get_field_index("loss_mask"), "loss_mask",
                           pa.array([np.ones(ids.shape[1], np.uint8)] * 2, pa.list_(pa.uint8())))
    with pytest.raises(ValueError, match="decode:.*loss position"):
        decode(bad, fmt)


def _task(fmt="prompt_response"):
    from raydistill.tasks.causal_lm import CausalLM

    return CausalLM(load_config(None, ["teacher.model=gpt2", "student.init_from_teacher={n_layer: 1}",
                                       f"data.format={fmt}"]))


def test_no_loss_on_prompt_tokens_perturbed_prompt_targets_change_nothing(tok):
    """Targets at prompt positions perturbed (a loss_on: all store decoded, prompt positions replaced
    by noise): the masked labels leave the loss and its gradient unchanged, plain and fused."""
    from raydistill.chunked_loss import fused_distill_loss
    from raydistill.losses import distill_loss

    ids, mask, length = _batch(tok)
    table = pa.table({"input_ids": pa.array(list(ids.numpy())), "loss_mask": pa.array(list(mask.numpy())),
                      "length": pa.array(length, pa.int32())})
    inputs = _task().inputs_from_arrow(table)
    labels = _task().labels(inputs)
    pos = mask[:, 1:] != 0
    assert torch.equal(labels != -100, pos)                       # -100 on prompt tokens and padding
    assert torch.equal(inputs["attention_mask"].sum(1), torch.from_numpy(length.astype(np.int64)))
    vocab = len(tok)
    torch.manual_seed(0)
    full = encode(torch.randn(*ids.shape, vocab), ids, fmt="topk", k=6, vocab_size=vocab)
    _, targets = decode(build_table(full, seq_id=[0, 1], input_ids=ids, policy_version=-1, fmt="topk",
                                    vocab_size=vocab), "topk")
    noisy = targets._map(lambda t: t.clone())
    noisy.ids[~pos] = torch.randint(0, vocab, noisy.ids[~pos].shape)
    noisy.logprobs[~pos] = torch.log_softmax(torch.randn(noisy.logprobs[~pos].shape), -1)
    hidden, weight = torch.randn(2, ids.shape[1] - 1, 8, requires_grad=True), torch.randn(vocab, 8)

    def loss_and_grad(t, fused):
        hidden.grad = None
        if fused:
            loss, _ = fused_distill_loss(hidden, weight, t, labels, alpha=0.5, chunk_tokens=5)
        else:
            loss, _ = distill_loss(hidden @ weight.T, t, labels, alpha=0.5)
        loss.backward()
        return loss.detach(), hidden.grad.clone()

    for fused in (False, True):
        a, ga = loss_and_grad(targets, fused)
        b, gb = loss_and_grad(noisy, fused)
        assert torch.equal(a, b) and torch.equal(ga, gb), fused
        assert (ga[~pos] == 0).all() and ga[pos].abs().sum() > 0
    # and the same perturbation without the mask does move the loss
    unmasked = ids[:, 1:]
    assert distill_loss(hidden @ weight.T, targets, unmasked, alpha=0.5)[0] != \
        distill_loss(hidden @ weight.T, noisy, unmasked, alpha=0.5)[0]


def test_eval_metrics_cover_loss_positions_only(tok, tmp_path):
    import torch.nn.functional as F

    from raydistill.evaluate import evaluate

    ids, mask, length = _batch(tok)
    student = tiny.make_gpt2(str(tmp_path / "s"), tok, n_layer=1, n_embd=16, seed=2).eval()
    teacher = tiny.make_gpt2(str(tmp_path / "t"), tok, n_layer=1, n_embd=16, seed=3).eval()
    am = (torch.arange(ids.shape[1])[None] < torch.from_numpy(length.astype(np.int64))[:, None]).long()
    got = evaluate(student, teacher, ids, batch_size=1, loss_mask=mask, attention_mask=am)
    pos = mask[:, 1:] != 0
    with torch.no_grad():
        s = F.log_softmax(student(input_ids=ids, attention_mask=am).logits[:, :-1], -1)[pos]
        t = F.log_softmax(teacher(input_ids=ids, attention_mask=am).logits[:, :-1], -1)[pos]
    y = ids[:, 1:][pos]
    assert got["tokens"] == int(pos.sum()) < ids.shape[0] * (ids.shape[1] - 1)
    assert got["student"]["ce"] == pytest.approx(float(-s.gather(1, y[:, None]).mean()), rel=1e-5)
    assert got["teacher"]["ce"] == pytest.approx(float(-t.gather(1, y[:, None]).mean()), rel=1e-5)
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean()
    assert got["student"]["kl_teacher_student"] == pytest.approx(float(kl), rel=1e-4)
    assert got["student"]["top1_agreement"] == pytest.approx(float((s.argmax(-1) == t.argmax(-1)).double().mean()))
    everywhere = evaluate(student, teacher, ids, batch_size=1)
    assert everywhere["student"]["ce"] != pytest.approx(got["student"]["ce"], rel=1e-3)


# ------------------------------------------------------------------------------ bad input (before Ray)

def _cfg(tmp_path, tiny_dir, corpus, *over):
    return load_config(None, [f"teacher.model={tiny_dir / 'gpt2-teacher'}", "student.init_from_teacher={n_layer: 1}",
                              f"data.path={corpus}", "data.seq_len=48", f"run.output_dir={tmp_path / 'out'}",
                              *over])


def test_bad_instruction_config_is_refused_before_ray(tmp_path, tiny_dir):
    from raydistill.pipeline import preflight

    pr = tiny.write_examples(str(tmp_path / "pr.parquet"), tiny.example_pairs(8))
    chat = tiny.write_examples(str(tmp_path / "chat.parquet"), tiny.example_pairs(8), kind="chat")
    with pytest.raises(ConfigError, match="data.format: 'chatml' is not one of text, chat, prompt_response"):
        _cfg(tmp_path, tiny_dir, pr, "data.format=chatml")
    with pytest.raises(ConfigError, match="data.loss_on: 'prompt' is not one of response, all"):
        _cfg(tmp_path, tiny_dir, pr, "data.format=prompt_response", "data.loss_on=prompt")
    # a prompt/response file read as chat: no messages column
    cfg = _cfg(tmp_path, tiny_dir, pr, "data.format=chat", f"data.chat_template={tiny.CHAT_TEMPLATE!r}")
    with pytest.raises(ConfigError, match=r"data.messages_column: column 'messages' is not in .*pr.parquet "
                                          r"\(columns: prompt, response\)"):
        preflight(cfg)
    with pytest.raises(ConfigError, match="data.response_column: column 'answer' is not in"):
        preflight(_cfg(tmp_path, tiny_dir, pr, "data.format=prompt_response", "data.response_column=answer"))
    # the tiny tokenizer has no chat template of its own
    with pytest.raises(ConfigError, match=r"data.chat_template: the tokenizer of .*gpt2-teacher has no chat "
                                          r"template.*set data.chat_template"):
        preflight(_cfg(tmp_path, tiny_dir, chat, "data.format=chat"))
    with pytest.raises(ConfigError, match="data.chat_template: .*neither a Jinja template .*nor an existing file"):
        preflight(_cfg(tmp_path, tiny_dir, chat, "data.format=chat", "data.chat_template=missing.jinja"))
    template_file = tmp_path / "t.jinja"
    template_file.write_text(tiny.CHAT_TEMPLATE)
    preflight(_cfg(tmp_path, tiny_dir, chat, "data.format=chat", f"data.chat_template={template_file}"))
    with pytest.raises(ConfigError, match="data.format: chat examples .* are for task causal_lm"):
        _cfg(tmp_path, tiny_dir, chat, "data.format=chat", "task=sequence_classification")


# ------------------------------------------------------------------------------ real Ray: pass + fit

@pytest.fixture(scope="module")
def example_runs(ray_session, tmp_path_factory, tiny_dir):
    """One prompt_response corpus; a store with loss_on response (scored, then a short fit) and one
    with loss_on all (scored): the module's real-Ray work, done once."""
    import os

    from raydistill.data import build_inputs
    from raydistill.models import preflight
    from raydistill.pipeline import open_store, score_pending
    from raydistill.train import fit_student, read_final_state

    root = tmp_path_factory.mktemp("instruct")
    pairs = tiny.example_pairs(120)
    corpus = tiny.write_examples(str(root / "pr.parquet"), pairs)
    out = {"pairs": pairs}
    for loss_on in ("response", "all"):
        cfg = _cfg(root / loss_on, tiny_dir, corpus, "data.format=prompt_response", f"data.loss_on={loss_on}",
                   "data.eval_fraction=0.1", "targets.format=sampled", "targets.samples=50",
                   "targets.shard_rows=40", "teacher.replicas=1", "teacher.cpus_per_replica=0.5",
                   "teacher.batch_size=16", "train.workers=1", "train.cpus_per_worker=0.5", "train.batch_size=8",
                   "train.max_steps=3", "train.log_every=1", "train.checkpoint_every=3", "train.alpha=0.5",
                   f"run.name=instruct{os.getpid()}-{loss_on}")
        info = preflight(cfg)
        store = open_store(cfg, info)
        inputs = build_inputs(cfg, store, info)
        stats = score_pending(cfg, store, info)
        out[loss_on] = {"cfg": cfg, "info": info, "store": store, "inputs": inputs, "stats": stats}
    r = out["response"]
    audit = root / "audit"
    os.environ["RAYDISTILL_AUDIT_DIR"] = str(audit)
    try:
        result, total = fit_student(r["cfg"], r["store"], r["info"].vocab_size)
    finally:
        del os.environ["RAYDISTILL_AUDIT_DIR"]
    r.update(result=result, total=total, state=read_final_state(result),
             order=np.concatenate([np.load(f) for f in sorted(glob.glob(str(audit / "student-rank0-epoch0-*.npy")))]))
    return out


def _rows(store):
    return pa.concat_tables([store.read_shard(s) for s in store.shard_ids()])


@pytest.mark.slow
def test_store_of_examples_pass_fit_and_metrics(example_runs, tiny_dir):
    """The inputs are the rendered examples; the store holds targets at loss positions only (counted,
    and equal to the dense teacher's there); the trainer's first loss is the masked loss; held-out
    metrics cover the loss positions; store bytes per token shrink against loss_on: all."""
    import torch.nn.functional as F

    from raydistill.losses import distill_loss
    from raydistill.models import build_student, load_causal_lm, load_tokenizer

    r, a = example_runs["response"], example_runs["all"]
    cfg, store = r["cfg"], r["store"]
    tok = load_tokenizer(str(tiny_dir / "gpt2-teacher"))
    pairs = example_runs["pairs"]
    want = instruct.render_rows(tok, [{"prompt": p, "response": q} for p, q in pairs], cfg.data)
    want = {k: v[want["valid"]] for k, v in want.items()}             # seq_id = position among usable rows
    assert r["inputs"]["docs"] == len(want["length"]) and r["inputs"]["skipped_rows"] == 120 - len(want["length"])

    rows = _rows(store)
    sid = rows["seq_id"].to_numpy()
    ids = np.stack(rows["input_ids"].to_numpy(zero_copy_only=False)).astype(np.int64)
    mask = np.stack(rows["loss_mask"].to_numpy(zero_copy_only=False))
    assert np.array_equal(ids, want["input_ids"][sid]) and np.array_equal(mask, want["loss_mask"][sid])
    assert np.array_equal(rows["length"].to_numpy(), want["length"][sid])
    # targets at loss positions only: one sample_len / label_logprob entry per loss position, counted
    n_loss = mask[:, 1:].sum(1)
    assert [len(x) for x in rows["sample_len"].to_pylist()] == n_loss.tolist()
    assert [len(x) for x in rows["label_logprob"].to_pylist()] == n_loss.tolist()
    real = int(rows["length"].to_numpy().sum())
    assert n_loss.sum() < real - len(sid)                              # fewer than every real position
    # ... and they are the dense teacher's there (float16 label log-probs)
    ids_t, targets = decode(rows.slice(0, 8), "sampled")
    inputs = _task().inputs_from_arrow(rows.slice(0, 8))
    teacher = load_causal_lm(str(tiny_dir / "gpt2-teacher"))
    with torch.no_grad():
        lp = F.log_softmax(teacher(input_ids=ids_t, attention_mask=inputs["attention_mask"]).logits[:, :-1], -1)
    pos = inputs["loss_mask"][:, 1:]
    dense = lp.gather(-1, ids_t[:, 1:, None])[..., 0][pos]
    assert torch.allclose(targets.label_logprob[pos], dense, atol=2e-3)

    # training ran over the masked store, and its first loss is the masked distill loss of its first batch
    state = r["state"]
    assert r["result"].error is None and state["step"] == r["total"] == 3
    first = rows.take([int(np.flatnonzero(sid == s)[0]) for s in r["order"][:8]])
    torch.manual_seed(cfg.run.seed)
    student = build_student(cfg.student, cfg.teacher.model, seed=cfg.run.seed).train()
    b_inputs = _task().inputs_from_arrow(first)
    _, b_targets = decode(first, "sampled")
    logits = student(input_ids=b_inputs["input_ids"], attention_mask=b_inputs["attention_mask"]).logits[:, :-1]
    masked, _ = distill_loss(logits, b_targets, _task().labels(b_inputs), alpha=0.5)
    assert state["history"][0]["loss"] == pytest.approx(float(masked.detach()), rel=1e-4, abs=1e-5)

    # held-out metrics: the task's figures are over the eval rows' loss positions
    eval_table = store.read_input_file(store.manifest()["inputs"]["eval"])
    assert eval_table.num_rows == r["inputs"]["eval_rows"] > 0
    got = _task().evaluate(None, teacher, eval_table, batch_size=4, max_rows=64)
    e_in = _task().inputs_from_arrow(eval_table)
    e_pos = e_in["loss_mask"][:, 1:]
    assert got["tokens"] == int(e_pos.sum()) and got["eval_sequences"] == eval_table.num_rows
    with torch.no_grad():
        e_lp = F.log_softmax(teacher(input_ids=e_in["input_ids"], attention_mask=e_in["attention_mask"])
                             .logits[:, :-1], -1)
    ce = -e_lp.gather(-1, e_in["input_ids"][:, 1:, None])[..., 0][e_pos].mean()
    assert got["teacher"]["ce"] == pytest.approx(float(ce), rel=1e-5)

    # store bytes per real token: loss_on all stores targets at every real position after the first
    assert a["inputs"]["train_rows"] == r["inputs"]["train_rows"]
    a_rows = _rows(a["store"])
    assert sum(len(x) for x in a_rows["sample_len"].to_pylist()) == int(a_rows["length"].to_numpy().sum()) - len(a_rows)
    per_token = {k: sum(example_runs[k]["store"].current(s)["bytes"] for s in example_runs[k]["store"].shard_ids())
                 / real for k in ("response", "all")}
    assert per_token["all"] > per_token["response"] * 1.2, per_token


@pytest.mark.slow
def test_chat_rows_through_ray_data_equal_the_driver_path(ray_session, tmp_path, tiny_dir):
    """A large corpus streams through Ray Data (list<struct> messages arrive as numpy objects): the
    same rows as the driver's in-process read of a small one."""
    from raydistill.data import packed_in_process, resolve_corpus, sequences_dataset

    corpus = tiny.write_examples(str(tmp_path / "chat.parquet"), tiny.example_pairs(40), kind="chat")
    cfg = _cfg(tmp_path, tiny_dir, corpus, "data.format=chat", f"data.chat_template={tiny.CHAT_TEMPLATE!r}")
    fs, files, fmt = resolve_corpus(cfg.data)
    teacher, eos = str(tiny_dir / "gpt2-teacher"), 0

    def stacked(batches):
        batches = list(batches)
        return {k: np.concatenate([b[k][b["valid"]] for b in batches])
                for k in ("input_ids", "loss_mask", "length")}, sum(int(b["docs"].sum()) for b in batches)

    ray_rows, ray_docs = stacked(sequences_dataset(cfg, fs, files, fmt, teacher, eos).iter_batches(
        batch_size=None, batch_format="numpy"))
    local_rows, local_docs = stacked(packed_in_process(cfg, fs, files, fmt, teacher, eos))
    assert ray_docs == local_docs == len(local_rows["length"]) > 30
    for k in local_rows:
        assert np.array_equal(ray_rows[k], local_rows[k]), k
    assert (local_rows["loss_mask"].sum(1) > 0).all()
