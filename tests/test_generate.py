"""Teacher generation passes (raydistill.generate_pass) with real Ray Data actor pools, real Parquet
and tiny real HF models, offline: rows per prompt, greedy equals model.generate, provenance, resume,
keep: both, a replica killed mid-pass, refresh re-generation, the scoring pass over generated rows."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

import arith_data
import tiny
from raydistill.config import load_config
from raydistill.data import build_inputs
from raydistill.errors import ConfigError
from raydistill.generate_pass import (GEN_SEQ_BASE, SOURCE, apply_template, generate_batch, generation_params,
                                      generate_pending, pending_generation, prompt_seq_id, read_prompts_file,
                                      run_generation_pass)
from raydistill.instruct import prompt_ids
from raydistill.models import load_causal_lm, load_tokenizer, preflight
from raydistill.pipeline import open_store, score_pending
from raydistill.teacher import target_params

SEQ_LEN, NEW = 40, 10


def gen_cfg(root, model_dir, corpus, **over):
    overrides = [f"teacher.model={model_dir}", "student.init_from_teacher={n_layer: 1}", f"data.path={corpus}",
                 "data.format=prompt_response", "data.prompt_column=question", "data.response_column=response",
                 f"data.seq_len={SEQ_LEN}", "data.eval_fraction=0.1", "targets.format=topk", "targets.k=4",
                 "targets.shard_rows=12", "teacher.replicas=2", "teacher.cpus_per_replica=0.5",
                 "teacher.batch_size=8", "generate.enabled=true", f"generate.max_new_tokens={NEW}",
                 "generate.temperature=0.8", "generate.num_return_sequences=2",
                 f"generate.prompt_template={arith_data.TEMPLATE!r}", f"run.output_dir={root / 'out'}"]
    overrides += [f"{k.replace('__', '.')}={v}" for k, v in over.items()]
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A char-level tokenizer and a random tiny GPT-2 teacher on it, a 60-question corpus."""
    root = tmp_path_factory.mktemp("gen-models")
    tok = arith_data.make_char_tokenizer(str(root / "tok"))
    tiny.make_gpt2(str(root / "teacher"), tok, n_layer=2, n_embd=32, n_positions=64, seed=5)
    corpus = arith_data.write_corpus(str(root / "qa.parquet"), arith_data.pairs(seed=3)[:60])
    return root / "teacher", corpus


@pytest.fixture(scope="module")
def base_store(ray_session, tmp_path_factory, models):
    """The dataset's own input rows, built once (prompt_response); each test works on a copy."""
    root = tmp_path_factory.mktemp("gen-base")
    cfg = gen_cfg(root, *models)
    info = preflight(cfg)
    store = open_store(cfg, info)
    inputs = build_inputs(cfg, store, info)
    store.release_lease()
    assert inputs["shards"] >= 4, inputs
    return root / "out" / "targets", inputs


def copy_store(tmp_path, base, models, **over):
    uri, inputs = base
    shutil.copytree(uri, tmp_path / "targets")
    cfg = gen_cfg(tmp_path, *models, targets__store=tmp_path / "targets", **over)
    info = preflight(cfg)
    return cfg, info, open_store(cfg, info), inputs


def dataset_rows(store) -> dict[int, list[int]]:
    """{seq_id: prompt ids} of the dataset's own rows (their inputs files)."""
    out = {}
    for sid, rec in store.manifest()["inputs"]["shards"].items():
        table = read_prompts_file(store, rec["prompts"] if rec.get("source") == SOURCE else rec)
        for seq, ids, mask in zip(table["seq_id"].to_pylist(), table["input_ids"].to_pylist(),
                                  table["loss_mask"].to_pylist()):
            out[seq] = prompt_ids(ids, mask)
    return out


def generated_tables(store, shard_ids):
    recs = store.manifest()["inputs"]["shards"]
    return {sid: store.read_input_file(recs[sid]["input"]) for sid in shard_ids}


def check_rows(table, prompts: dict[int, list[int]], tok, n: int, template):
    """Every row: its prompt (templated) first, the mask exactly on the response, padding after."""
    for seq, ids, mask, length in zip(table["seq_id"].to_pylist(), table["input_ids"].to_pylist(),
                                      table["loss_mask"].to_pylist(), table["length"].to_pylist()):
        p = apply_template(tok, prompts[int(prompt_seq_id(seq, n))], template)
        assert ids[:len(p)] == p
        assert len(ids) == len(mask) == SEQ_LEN and len(p) < length <= SEQ_LEN
        assert mask == [0] * len(p) + [1] * (length - len(p)) + [0] * (SEQ_LEN - length)
        assert length - len(p) <= NEW


def test_config_checks():
    base = ["teacher.model=gpt2", "student.init_from_teacher={n_layer: 1}"]
    with pytest.raises(ConfigError) as e:
        load_config(None, base + ["generate.enabled=true", "generate.num_return_sequences=2",
                                  "generate.prompt_template='{question}'", "generate.keep=bth",
                                  "generate.top_p=0", "data.answer_column=answer"])
    msg = str(e.value)
    for key in ("generate.enabled: data.format is text", "generate.num_return_sequences: 2 greedy",
                "generate.prompt_template:", "generate.keep: 'bth' is not one of teacher, both — did you mean 'both'",
                "generate.top_p: 0.0 is outside (0, 1]", "data.answer_column: answers are matched"):
        assert key in msg, (key, msg)
    with pytest.raises(ConfigError, match="generate.enabled: data.loss_on=all"):
        load_config(None, base + ["generate.enabled=true", "data.format=prompt_response", "data.loss_on=all"])
    ok = load_config(None, base + ["generate.enabled=true", "data.format=prompt_response",
                                   "generate.temperature=0.7", "generate.num_return_sequences=3",
                                   "generate.prompt_template='{prompt} think:'", "rationale.answer_prefix='A:'"])
    assert ok.generate.num_return_sequences == 3 and ok.rationale.answer_prefix == "A:"


def test_sampled_pass_rows_provenance_resume_and_scoring(base_store, tmp_path, models):
    """N prompts -> N x 2 rows, each beginning with its prompt; manifest provenance; resume skips all;
    a re-run with new parameters regenerates; the scoring pass scores the generated rows."""
    cfg, info, store, inputs = copy_store(tmp_path, base_store, models)
    tok = load_tokenizer(str(models[0]))
    prompts = dataset_rows(store)
    assert len(prompts) == inputs["train_rows"]
    sids = sorted(store.manifest()["inputs"]["shards"])
    first = run_generation_pass(cfg, store, sids[:2], vocab_size=info.vocab_size, teacher_rev=info.teacher_rev)
    assert first["complete"] and first["shards"] == 2
    # resumable: the two recorded shards are not generated again
    assert pending_generation(cfg, store, info.teacher_rev) == sids[2:]
    stats = generate_pending(cfg, store, info)
    assert stats["shards"] == len(sids) - 2 and stats["complete"]
    assert first["prompts"] + stats["prompts"] == inputs["train_rows"]
    assert first["rows"] + stats["rows"] == 2 * inputs["train_rows"]
    assert generate_pending(cfg, store, info) is None

    recs = store.manifest()["inputs"]["shards"]
    assert sorted(recs) == sids  # keep: teacher replaces each shard's own rows
    seen = []
    for sid, table in generated_tables(store, sids).items():
        rec = recs[sid]
        assert rec["source"] == SOURCE and rec["teacher_rev"] == info.teacher_rev and rec["generation"] == 1
        assert rec["generate"] == generation_params(cfg) and rec["rows"] == table.num_rows
        assert rec["prompts"]["input"] == f"inputs/train/{sid}.parquet"
        check_rows(table, prompts, tok, 2, arith_data.TEMPLATE)
        seen += table["seq_id"].to_pylist()
    assert len(seen) == len(set(seen)) == 2 * len(prompts) and min(seen) >= GEN_SEQ_BASE
    ids, counts = np.unique(prompt_seq_id(seen, 2), return_counts=True)
    assert sorted(ids.tolist()) == sorted(prompts) and set(counts.tolist()) == {2}
    # two draws per prompt at temperature 0.8: not copies of each other (most prompts)
    tables = generated_tables(store, sids)
    rows = [r for t in tables.values() for r in t["input_ids"].to_pylist()]
    assert sum(a != b for a, b in zip(rows[0::2], rows[1::2])) > 0.8 * len(prompts)

    # the scoring pass scores the generated rows like any others
    scored = score_pending(cfg, store, info)
    assert scored["shards"] == len(sids) and scored["rows"] == 2 * inputs["train_rows"]
    for sid in sids:
        shard = store.read_shard(sid)
        assert shard["seq_id"].equals(tables[sid]["seq_id"]) and shard["input_ids"].equals(tables[sid]["input_ids"])
    assert store.pending(info.teacher_rev, target_params(cfg.targets)) == []

    # new generation parameters: every shard is generated again (from the original prompts), and
    # its now-stale targets are invalidated so the scoring pass re-scores it
    cfg2 = gen_cfg(tmp_path, *models, targets__store=tmp_path / "targets", generate__max_new_tokens=NEW - 2)
    assert pending_generation(cfg2, store, info.teacher_rev) == sids
    again = generate_pending(cfg2, store, info)
    assert again["shards"] == len(sids) and again["prompts"] == inputs["train_rows"]
    recs = store.manifest()["inputs"]["shards"]
    assert all(recs[s]["generation"] == 2 and recs[s]["prompts"]["input"] == f"inputs/train/{s}.parquet"
               for s in sids)
    assert all(store.current(s) is None for s in sids)
    assert score_pending(cfg2, store, info)["shards"] == len(sids)
    store.release_lease()


def test_greedy_pass_equals_model_generate_and_keep_both(base_store, tmp_path, models):
    """temperature 0: each response equals model.generate on that prompt alone (no padding);
    keep: both adds <sid>-gen shards and leaves the dataset's own shards as they were."""
    cfg, info, store, inputs = copy_store(tmp_path, base_store, models, generate__temperature=0,
                                          generate__num_return_sequences=1, generate__keep="both")
    before = {sid: dict(rec) for sid, rec in store.manifest()["inputs"]["shards"].items()}
    prompts = dataset_rows(store)
    stats = generate_pending(cfg, store, info)
    assert stats["shards"] == len(before) and stats["rows"] == inputs["train_rows"]
    recs = store.manifest()["inputs"]["shards"]
    assert sorted(recs) == sorted(list(before) + [f"{s}-gen" for s in before])
    assert all(recs[s] == before[s] for s in before)

    tok = load_tokenizer(str(models[0]))
    model = load_causal_lm(str(models[0]))
    checked = 0
    for sid, table in generated_tables(store, [f"{s}-gen" for s in before]).items():
        check_rows(table, prompts, tok, 1, arith_data.TEMPLATE)
        for seq, ids, length in zip(table["seq_id"].to_pylist(), table["input_ids"].to_pylist(),
                                    table["length"].to_pylist()):
            p = apply_template(tok, prompts[int(prompt_seq_id(seq, 1))], arith_data.TEMPLATE)
            with torch.inference_mode():
                direct = model.generate(input_ids=torch.tensor([p]), max_new_tokens=min(NEW, SEQ_LEN - len(p)),
                                        do_sample=False, pad_token_id=tok.eos_token_id)[0, len(p):].tolist()
            if tok.eos_token_id in direct:
                direct = direct[:direct.index(tok.eos_token_id) + 1]
            assert ids[len(p):length] == direct[:SEQ_LEN - len(p)], (sid, seq)
            checked += 1
    assert checked == inputs["train_rows"]
    # the batched helper itself: left padding changes nothing either
    batch = [prompts[s] for s in sorted(prompts)[:5]]
    single = [generate_batch(model, [p], pad_id=tok.eos_token_id, eos_id=tok.eos_token_id, max_new_tokens=6)[0]
              for p in batch]
    assert generate_batch(model, batch, pad_id=tok.eos_token_id, eos_id=tok.eos_token_id,
                          max_new_tokens=6) == single
    assert pending_generation(cfg, store, info.teacher_rev) == []
    store.release_lease()


@pytest.mark.slow
def test_replica_killed_mid_pass_loses_and_duplicates_no_prompt(base_store, tmp_path, models, monkeypatch):
    cfg, info, store, inputs = copy_store(tmp_path, base_store, models)
    prompts = dataset_rows(store)
    marker = tmp_path / "gen-replica-killed"
    monkeypatch.setenv("RAYDISTILL_TEACHER_KILL_AT_SHARD", "2")
    monkeypatch.setenv("RAYDISTILL_TEACHER_KILL_MARKER", str(marker))
    monkeypatch.setenv("RAYDISTILL_TEACHER_KILL_WHEN", "after_write")
    stats = generate_pending(cfg, store, info)
    assert marker.exists(), "the replica was not killed"
    with pytest.raises(ProcessLookupError):
        os.kill(int(marker.read_text()), 0)
    monkeypatch.delenv("RAYDISTILL_TEACHER_KILL_AT_SHARD")
    sids = sorted(store.manifest()["inputs"]["shards"])
    assert stats["complete"] and stats["shards"] == len(sids) == inputs["shards"]
    assert stats["prompts"] == inputs["train_rows"] and stats["rows"] == 2 * inputs["train_rows"]
    seen = [s for t in generated_tables(store, sids).values() for s in t["seq_id"].to_pylist()]
    assert len(seen) == len(set(seen)) == 2 * len(prompts)
    ids, counts = np.unique(prompt_seq_id(seen, 2), return_counts=True)
    assert sorted(ids.tolist()) == sorted(prompts) and set(counts.tolist()) == {2}
    assert pending_generation(cfg, store, info.teacher_rev) == []
    store.release_lease()


@pytest.mark.slow
def test_refresh_teacher_source_regenerates_generated_shards(base_store, tmp_path, models):
    """refresh.source teacher on a generated shard: new responses by the current teacher, recorded as
    generation 2 at the refresh step, then scored into a new version (other shards untouched)."""
    from raydistill.refresh.passes import teacher_pass
    from raydistill.refresh.policy import RefreshDecision
    from raydistill.refresh.pool import TeacherPool

    cfg, info, store, inputs = copy_store(tmp_path, base_store, models, refresh__policy="round_robin",
                                          refresh__fraction=0.25, refresh__source="teacher")
    generate_pending(cfg, store, info)
    score_pending(cfg, store, info)
    sids = sorted(store.manifest()["inputs"]["shards"])
    old = generated_tables(store, sids)
    pool = TeacherPool(cfg, store, vocab_size=info.vocab_size, size=1, teacher_rev=info.teacher_rev)
    committed = []
    try:
        stats = teacher_pass(cfg, store, RefreshDecision(shard_ids=(sids[0],), reason="test", step=5),
                             lambda sid, rec: committed.append(sid), pool_for=lambda rev: pool,
                             vocab_size=info.vocab_size, policy_dir=None)
    finally:
        pool.close()
    assert committed == [sids[0]] and stats["generated_shards"] == 1 and stats["generated_tokens"] > 0
    recs = store.manifest()["inputs"]["shards"]
    assert recs[sids[0]]["generation"] == 2 and recs[sids[0]]["produced_at_step"] == 5
    assert all(recs[s]["generation"] == 1 for s in sids[1:])
    new = generated_tables(store, [sids[0]])[sids[0]]
    assert new["seq_id"].equals(old[sids[0]]["seq_id"])              # the same prompts ...
    assert not new["input_ids"].equals(old[sids[0]]["input_ids"])    # ... new responses (sampled)
    shard = store.read_shard(sids[0])
    assert store.current(sids[0])["version"] == 2 and store.current(sids[0])["produced_at_step"] == 5
    assert shard["input_ids"].equals(new["input_ids"])
    assert all(store.current(s)["version"] == 1 for s in sids[1:])
    store.release_lease()


class OracleModel:
    """Unit-test stand-in for a causal LM's generate(): answers each (left-padded) addition prompt with
    its rationale, wrong (+1) on every third prompt. Checks answers.py's own logic: templating, gold
    matching, parsing after the prefix."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask, generation_config):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            text = self.tok.decode([t for t, m in zip(ids, mask) if m])
            assert text.endswith(arith_data.TEMPLATE.format(prompt="")), text  # asked as in training
            a, b = map(int, text.split("=")[0].split("+"))
            wrong = self.calls % 3 == 2
            self.calls += 1
            r = arith_data.rationale(a, b + wrong)
            rows.append(ids + self.tok(r, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id])
        width = max(map(len, rows))
        return torch.tensor([r + [self.tok.eos_token_id] * (width - len(r)) for r in rows])


def test_answer_accuracy_logic(models, tmp_path):
    from raydistill.answers import answer_accuracy, parse_answer
    from raydistill.data import inputs_table
    from raydistill.instruct import render_rows
    from raydistill.tasks import get_task

    assert parse_answer(" 7+8=15,5+6+1=12;A:125", "A:") == "125"
    assert parse_answer("A:1 A: 42\nmore", "A:") == "42" and parse_answer("no answer", "A:") is None
    assert parse_answer(" 99 \nx", None) == "99"
    cfg = gen_cfg(tmp_path, *models, rationale__answer_prefix="'A:'", data__answer_column="answer",
                  teacher__batch_size=4, generate__max_new_tokens=30, data__seq_len=64)
    tok = load_tokenizer(str(models[0]))
    qa = arith_data.pairs(seed=3)[:10]
    rows = render_rows(tok, [{"question": arith_data.question(a, b), "response": f"A:{a + b}"} for a, b in qa],
                       cfg.data)
    extra = {"loss_mask": rows["loss_mask"], "length": rows["length"][:, None]}
    schema = get_task(cfg).input_schema(len(tok))
    table = inputs_table(np.arange(10), rows["input_ids"], len(tok), extra=extra, schema=schema)
    acc, counts = answer_accuracy(cfg, OracleModel(tok), table)
    assert counts == {"prompts": 10, "matched": 10} and acc == pytest.approx(7 / 10)  # calls 2, 5, 8 wrong
