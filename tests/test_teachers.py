"""Several teachers (`teachers:`, `routing:`): raydistill/teachers.py.

One module-scoped store is built with real Ray (one Ray Data actor pool per teacher), real Parquet
and two tiny GPT-2 teachers sharing one tokenizer, made peaked and different (their final layer
norm scaled) so that which teacher produced a target is visible: rows of domain `code` go to
teacher `code`, `prose` to `prose`, every other value to the 0.6 / 0.4 mixture. The tests read
that store back against the dense teacher distributions; the last one changes one teacher's
checkpoint and re-runs the pass. Bad inputs are refused before Ray starts.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

import tiny
from raydistill.config import Config
from raydistill.errors import ConfigError
from raydistill.store import component_id
from raydistill.targets import decode

SEQ_LEN = 24
WEIGHTS = {"code": 0.6, "prose": 0.4}   # 50 draws: 30 / 20, so the stratified mix is exact in expectation


def _peaked_gpt2(path: str, tok, seed: int, scale: float) -> None:
    """A tiny GPT-2 whose next-token distributions are sharp (ln_f scaled): teachers that differ."""
    model = tiny.make_gpt2(path, tok, n_layer=1, n_embd=32, seed=seed)
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(scale)
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers-models")
    tok = tiny.make_tokenizer(str(root / "tok"))
    _peaked_gpt2(str(root / "code"), tok, seed=11, scale=20.0)
    _peaked_gpt2(str(root / "prose"), tok, seed=12, scale=20.0)
    other = tiny.make_tokenizer(str(root / "tok-other"), tiny.corpus_texts(50, seed=9), vocab_size=300)
    tiny.make_gpt2(str(root / "other-vocab"), other, n_layer=1, n_embd=16, seed=13)
    return root


def _corpus(path: str, domains: list[str]) -> str:
    texts = tiny.corpus_texts(len(domains) * 40, seed=4)
    pq.write_table(pa.table({"text": texts, "domain": [domains[i % len(domains)] for i in range(len(texts))]}), path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _corpus(str(tmp_path_factory.mktemp("teachers-corpus") / "corpus.parquet"), ["code", "prose", "misc"])


def _config(models, corpus, out, **over) -> dict:
    d = {"run": {"name": f"teachers-{os.path.basename(out)}", "output_dir": str(out)},
         "data": {"path": corpus, "seq_len": SEQ_LEN, "eval_fraction": 0.1},
         "teachers": [{"name": n, "model": str(models / n), "weight": w, "cpus_per_replica": 0.5, "batch_size": 16}
                      for n, w in WEIGHTS.items()],
         "routing": {"column": "domain", "teachers": {"code": "code", "prose": "prose"}, "default": "mixture"},
         "targets": {"shard_rows": 24},
         "student": {"init_from_teacher": {"n_layer": 1, "n_embd": 16}},
         "train": {"workers": 1, "batch_size": 4, "max_steps": 4, "cpus_per_worker": 0.5}}
    for k, v in over.items():
        d[k] = v
    return d


@pytest.fixture(scope="module")
def built(ray_session, models, corpus, tmp_path_factory):
    """The store of a routed run with a mixture default: inputs, each teacher's pass, the mixes."""
    from raydistill import pipeline, teachers

    cfg = Config.from_dict(_config(models, corpus, tmp_path_factory.mktemp("teachers-run")))
    info = pipeline.preflight(cfg)
    store = pipeline.open_store(cfg, info)
    inputs = teachers.build_inputs(cfg, store, info)
    passes = teachers.score_pending(cfg, store, info.vocab_size)
    yield {"cfg": cfg, "info": info, "store": store, "inputs": inputs, "passes": passes}
    store.release_lease()


def _dense(model_dir, input_ids: torch.Tensor) -> torch.Tensor:
    """The dense teacher's log p [B, T, V] at every target position (capture temperature 1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return F.log_softmax(model(input_ids=input_ids).logits[:, :-1].float(), dim=-1)


def _sampled_mass(targets, ids: torch.Tensor) -> torch.Tensor:
    """p_hat(ids) [B, T]: the decoded sampled distribution's mass on one id per position."""
    hit = (targets.ids == ids.unsqueeze(-1)) & torch.isfinite(targets.logprobs)
    return torch.where(hit, targets.logprobs.exp(), torch.zeros_like(targets.logprobs)).sum(-1)


def _check_sampled_mean(p_hat: torch.Tensor, p: torch.Tensor, samples: int) -> float:
    """z-score of mean(p_hat - p) over positions: p_hat is a mean of `samples` draws of Bernoulli(p)."""
    se = math.sqrt(float((p * (1 - p)).sum()) / samples) / p.numel()
    return float((p_hat - p).mean()) / max(se, 1e-12)


def _shards_of(store, groups: dict, group: str) -> list[str]:
    return sorted(s for s, g in groups.items() if g == group)


@pytest.mark.slow
def test_routed_inputs_and_passes(built):
    """Each domain is packed into shards of its own group; each teacher scored only its rows."""
    from raydistill.teachers import shard_groups

    store, inputs = built["store"], built["inputs"]
    groups = shard_groups(store)
    assert set(groups.values()) == {"code", "prose", "mixture"}
    assert all(sid.endswith(f"-{g}") for sid, g in groups.items())
    rows = {g: sum(store.manifest()["inputs"]["shards"][s]["rows"] for s in _shards_of(store, groups, g))
            for g in ("code", "prose", "mixture")}
    assert rows == {g: inputs["groups"][g]["train_rows"] for g in rows} and all(rows.values())
    assert sum(rows.values()) == inputs["train_rows"]
    seq_ids = np.concatenate([store.read_input(s).column("seq_id").to_numpy() for s in groups])
    assert len(np.unique(seq_ids)) == len(seq_ids)           # groups never share a seq_id
    by_teacher = {p["teacher"]: p for p in built["passes"]}
    # No wasted teacher compute: a teacher scores its routed rows and the mixture rows, nothing else.
    assert by_teacher["code"]["rows"] == rows["code"] + rows["mixture"]
    assert by_teacher["prose"]["rows"] == rows["prose"] + rows["mixture"]
    assert by_teacher["mixture"]["rows"] == rows["mixture"]
    assert store.summary()["rows"] == inputs["train_rows"]    # components are not trained on


@pytest.mark.slow
@pytest.mark.parametrize("name,other", [("code", "prose"), ("prose", "code")])
def test_routed_rows_carry_exactly_their_teachers_targets(built, models, name, other):
    from raydistill.teachers import revisions, shard_groups

    store, cfg = built["store"], built["cfg"]
    shards = _shards_of(store, shard_groups(store), name)
    table = pa.concat_tables([store.read_shard(s) for s in shards])
    for s in shards:
        rec = store.current(s)
        assert rec["teacher"] == name and rec["teacher_rev"] == revisions(cfg)[name]
    ids, targets = decode(table, "sampled")
    own, wrong = _dense(models / name, ids), _dense(models / other, ids)
    labels = ids[:, 1:]
    own_label = own.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    wrong_label = wrong.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # label_logprob and entropy are the dense teacher's, to float16 rounding — and not the other's.
    assert torch.allclose(targets.label_logprob, own_label, atol=2e-2, rtol=1e-2)
    assert (targets.label_logprob - wrong_label).abs().mean() > 0.5
    own_h = -(own.exp() * own).sum(-1)
    assert torch.allclose(targets.entropy, own_h, atol=2e-2, rtol=1e-2)
    # The draws follow this teacher: mass on its most likely id matches it within 5 standard errors
    # (50 draws per position, thousands of positions), and is far from the other teacher's mass there.
    top = own.argmax(-1)
    p_hat, p_own = _sampled_mass(targets, top), own.exp().gather(-1, top.unsqueeze(-1)).squeeze(-1)
    p_wrong = wrong.exp().gather(-1, top.unsqueeze(-1)).squeeze(-1)
    assert abs(_check_sampled_mean(p_hat, p_own, cfg.targets.samples)) < 5
    assert abs(_check_sampled_mean(p_hat, p_wrong, cfg.targets.samples)) > 20


@pytest.mark.slow
def test_mixture_targets_equal_the_weighted_mixture(built, models):
    from raydistill.teachers import mix_revision, revisions, shard_groups

    store, cfg = built["store"], built["cfg"]
    shards = _shards_of(store, shard_groups(store), "mixture")
    for s in shards:
        rec, comps = store.current(s), {n: store.current(component_id(s, n)) for n in WEIGHTS}
        assert {n: c["teacher_rev"] for n, c in comps.items()} == revisions(cfg)
        assert all(c["teacher"] == n for n, c in comps.items())
        assert rec["teacher_rev"] == mix_revision(comps, WEIGHTS)
        assert rec["teachers"] == {n: {"teacher_rev": c["teacher_rev"], "version": c["version"],
                                       "produced_at_step": -1} for n, c in comps.items()}
    ids, targets = decode(pa.concat_tables([store.read_shard(s) for s in shards]), "sampled")
    lp = {n: _dense(models / n, ids) for n in WEIGHTS}
    mix = sum(w * lp[n].exp() for n, w in WEIGHTS.items())                  # [B, T, V]
    labels = ids[:, 1:]
    want = mix.gather(-1, labels.unsqueeze(-1)).squeeze(-1).log()
    assert torch.allclose(targets.label_logprob, want, atol=2e-2, rtol=1e-2)   # exact, to float16
    # Counts sum to `samples` at every position and estimate the mixture without bias: the mass on
    # each teacher's most likely id is within 5 standard errors of the mixture's, and far from what
    # either teacher alone puts there.
    assert torch.allclose(targets.logprobs.exp().nan_to_num(0).sum(-1), torch.ones(labels.shape), atol=1e-5)
    for n in WEIGHTS:
        top = lp[n].argmax(-1)
        p_hat, p_mix = _sampled_mass(targets, top), mix.gather(-1, top.unsqueeze(-1)).squeeze(-1)
        assert abs(_check_sampled_mean(p_hat, p_mix, cfg.targets.samples)) < 5
        for alone in WEIGHTS:
            p_alone = lp[alone].exp().gather(-1, top.unsqueeze(-1)).squeeze(-1)
            assert abs(_check_sampled_mean(p_hat, p_alone, cfg.targets.samples)) > 20


@pytest.mark.slow
def test_a_rerun_scores_nothing(built):
    from raydistill import teachers

    assert teachers.score_pending(built["cfg"], built["store"], built["info"].vocab_size) == []


@pytest.mark.slow
def test_refresh_rescores_each_shard_with_its_own_teachers(built):
    """A refresh pass (real scheduler, a long-lived pool per teacher) re-scores each chosen shard with
    the teacher(s) it has and re-mixes the mixture shards; the others keep their versions."""
    import dataclasses

    from raydistill import teachers
    from raydistill.refresh import RefreshScheduler

    store, info = built["store"], built["info"]
    cfg = dataclasses.replace(built["cfg"], refresh=dataclasses.replace(
        built["cfg"].refresh, policy="round_robin", fraction=0.5, every_steps=2, source="resample"))
    groups = teachers.shard_groups(store)
    before = {s: store.current(s)["version"] for s in store.manifest()["shards"]}
    s = RefreshScheduler(cfg, store, vocab_size=info.vocab_size, background=False, persist_every_s=0)
    try:
        assert s.shard_ids == sorted(groups)                   # components are not the scheduler's shards
        for step in (1, 2):
            s.on_step(step)
        st = s.status()
        assert st["passes"] == 1 and st["failed_passes"] == 0 and st["pool_replicas"] == 2
        by = st["max_age_seen_by_teacher"]     # each teacher's oldest targets; the largest is the run's
        assert set(by) == set(WEIGHTS) and max(by.values()) == st["max_age_seen"]
    finally:
        s.close_pool()
    chosen = {sid for sid in groups if store.current(sid)["produced_at_step"] == 2}
    assert len(chosen) == math.ceil(0.5 * len(groups))
    want = chosen | {component_id(c, n) for c in chosen if groups[c] == "mixture" for n in WEIGHTS}
    changed = {x for x, v in before.items() if store.current(x)["version"] != v}
    assert changed == want
    for sid in chosen:
        rec = store.current(sid)
        if groups[sid] == "mixture":
            assert {n: p["produced_at_step"] for n, p in rec["teachers"].items()} == {n: 2 for n in WEIGHTS}
        else:
            assert rec["teacher"] == groups[sid] and rec["source"] == "resample"
    log = st["pass_log"][-1]
    n_rows = sum(store.current(x)["rows"] for x in chosen)
    assert log["rows"] == n_rows and log["ok"]
    assert log["tokens"] == SEQ_LEN * sum(store.current(x)["rows"] for x in want if x not in groups or
                                          groups[x] != "mixture")


@pytest.mark.slow
def test_new_revision_of_one_teacher_rescores_only_its_rows(built, models):
    """Last in the module (it changes a teacher): a new checkpoint of `prose` re-scores prose's shards
    and components only, re-draws the mixes from the stored components, and leaves code's alone."""
    from raydistill import teachers

    store, cfg = built["store"], built["cfg"]
    groups = teachers.shard_groups(store)
    before = {s: store.current(s)["version"] for s in store.manifest()["shards"]}
    from transformers import AutoTokenizer

    _peaked_gpt2(str(models / "prose"), AutoTokenizer.from_pretrained(str(models / "tok")), seed=14, scale=20.0)
    passes = teachers.score_pending(cfg, store, built["info"].vocab_size)
    assert [p["teacher"] for p in passes] == ["prose", "mixture"]
    after = {s: store.current(s)["version"] for s in store.manifest()["shards"]}
    changed = {s for s in after if after[s] != before[s]}
    assert changed == set(teachers.taught_by(groups, "prose")) | set(_shards_of(store, groups, "mixture"))
    for s in _shards_of(store, groups, "mixture"):
        prov = store.current(s)["teachers"]
        assert prov["code"]["version"] == before[component_id(s, "code")]
        assert prov["prose"]["version"] == before[component_id(s, "prose")] + 1
        assert prov["prose"]["teacher_rev"] == teachers.revisions(cfg)["prose"]


@pytest.mark.slow
def test_end_to_end_run_reports_each_teacher(built):
    """pipeline.run on the built store (last: it reuses what the earlier tests scored): the student
    trains from routed and mixed shards; the report has each teacher's rows, compute and eval; with
    compare_single_teacher the same student is also trained from teacher `code` alone."""
    import dataclasses

    from raydistill import pipeline
    from raydistill.teachers import report_section, shard_groups

    cfg = dataclasses.replace(built["cfg"], compare_single_teacher="code")
    store = built["store"]
    report = pipeline.run(cfg)
    groups, shards = shard_groups(store), store.manifest()["inputs"]["shards"]
    info = store.manifest()["inputs"]["info"]
    assert report["train"]["steps"] == cfg.train.max_steps and os.path.isdir(report["outputs"]["student"])
    for name in WEIGHTS:
        t = report["teachers"][name]
        assert t["routed_rows"] == sum(shards[s]["rows"] for s, g in groups.items() if g == name)
        assert t["mixture_rows"] == sum(shards[s]["rows"] for s, g in groups.items() if g == "mixture")
        assert t["tokens"] == t["rows"] * SEQ_LEN
        prose_rows = report["teachers"]["prose"]["routed_rows"]
        compare = prose_rows * SEQ_LEN if name == "code" else 0   # code scored prose's rows for the comparison
        assert t["teacher_tokens"] == {"initial": 0, "refresh": 0, "compare_single_teacher": compare}
        # ... and the module's first build: each teacher's forward tokens = the rows it teaches, once.
        first = report_section(cfg, store, built["passes"], None, 0)[name]
        assert first["teacher_tokens"]["initial"] == t["rows"] * SEQ_LEN and first["teacher_seconds"] > 0
        ev = report["eval"]["teachers"][name]
        assert ev["all_rows"]["eval_sequences"] == info["eval_rows"]
        assert ev["own_rows"]["eval_sequences"] == info["groups"][name]["eval_rows"] > 0
        for label in ("student", "single_code_student"):
            assert all(math.isfinite(ev[part][label]["ce"]) for part in ("own_rows", "all_rows"))
    # compare_single_teacher: code's own targets for prose's rows, and a student trained on them alone.
    for sid in (s for s, g in groups.items() if g == "prose"):
        rec = store.current(component_id(sid, "code"))
        assert rec["teacher"] == "code" and rec["source"] == "compare_single_teacher"
        assert rec["rows"] == shards[sid]["rows"]
    assert report["history"]["single_code"] and os.path.isdir(report["outputs"]["student"])
    assert [p["teacher"] for p in report["teacher_passes"]] == ["code"]
    # The same student and rows, two teachers: the KL to each differs (each is measured against its own).
    assert (report["eval"]["teachers"]["code"]["all_rows"]["student"]["kl_teacher_student"]
            != report["eval"]["teachers"]["prose"]["all_rows"]["student"]["kl_teacher_student"])
    with open(report["files"]["report.md"]) as f:
        assert "## Teachers" in f.read()


def test_routed_shard_ids_interleave_the_groups():
    """The trainer reads shards in sorted id order: each group's shards are spread over it evenly."""
    from raydistill.teachers import _interleave

    ids = _interleave({"code": 4, "prose": 2, "mixture": 1})
    order = [g for _, g in sorted((sid, g) for (g, _), sid in ids.items())]
    assert order == ["code", "prose", "code", "mixture", "code", "prose", "code"]
    assert sorted(ids[("code", j)] for j in range(4)) == [ids[("code", j)] for j in range(4)]  # kept in order
    assert ids[("prose", 1)] == "00005-prose" and len(set(ids.values())) == 7


def test_scheduler_records_the_max_age_each_teacher_sees():
    """Ages per teacher (no Ray): a routed shard ages its teacher's targets, a mix each component's
    (the mix's own produced_at_step, which the one bound checks, is its oldest component's)."""
    from test_refresh_scheduler import MemoryStore, instant_pass, make_cfg

    from raydistill.refresh.scheduler import RefreshScheduler

    def records(store, mix_code: int, mix_prose: int) -> None:
        recs = {sid: store._m["shards"][sid]["versions"]["1"] for sid in store._m["shards"]}
        recs["00000"].update(teacher="code", produced_at_step=8)
        recs["00001"].update(teacher="prose", produced_at_step=5)
        recs["00002"].update(produced_at_step=min(mix_code, mix_prose), teachers={
            "code": {"produced_at_step": mix_code}, "prose": {"produced_at_step": mix_prose}})

    store = MemoryStore(3)
    records(store, mix_code=3, mix_prose=-1)
    none = RefreshScheduler(make_cfg(fraction=0.0), store, background=False, persist_every_s=1e9)
    for step in range(1, 21):
        none.on_step(step)
    st = none.status()
    # code: max(20 - 8, 20 - 3) = 17 (its mix component); prose: max(20 - 5, 20 - -1) = 21.
    assert st["max_age_seen_by_teacher"] == {"code": 17, "prose": 21} and st["max_age_seen"] == 21

    # Refreshed (round robin, one shard every 2 steps, bound 6): each pass commits the teachers' new
    # targets; every teacher's max age seen stays within the one bound, and the largest is the run's.
    store = MemoryStore(3)
    records(store, mix_code=-1, mix_prose=-1)
    inner = instant_pass()

    def run_pass(decision, on_commit):
        def commit(sid, rec):
            by = {"00000": {"teacher": "code"}, "00001": {"teacher": "prose"}}.get(sid) or {
                "teachers": {n: {"produced_at_step": decision.step} for n in ("code", "prose")}}
            on_commit(sid, dict(rec, **by))
        return inner(decision, commit)

    rr = RefreshScheduler(make_cfg(fraction=1 / 3, every=2), store, run_pass=run_pass, background=False,
                          persist_every_s=1e9)
    for step in range(1, 61):
        rr.on_step(step)
    st = rr.status()
    by = st["max_age_seen_by_teacher"]
    assert set(by) == {"code", "prose"} and max(by.values()) == st["max_age_seen"] <= st["bound_steps"] == 6
    assert st["passes"] == 30


# ---------------------------------------------------------------- refused before Ray starts


def _refused(cfg_dict, monkeypatch) -> str:
    """The error of a run refused before Ray starts (init_ray must not be reached)."""
    from raydistill import pipeline

    def no_ray(cfg):
        raise AssertionError("Ray was started for a run that should have been refused")

    monkeypatch.setattr(pipeline, "init_ray", no_ray)
    with pytest.raises(Exception) as e:
        pipeline.run(Config.from_dict(cfg_dict))
    assert not os.path.exists(os.path.join(cfg_dict["run"]["output_dir"], "targets"))
    return str(e.value)


def test_config_refusals(models, corpus, tmp_path):
    base = _config(models, corpus, tmp_path / "r")
    cases = {
        "teacher: set together with teachers:": dict(base, teacher={"model": str(models / "code")}),
        "teachers[1].name: 'code' is used by an earlier teacher": dict(
            base, teachers=[dict(base["teachers"][0]), dict(base["teachers"][1], name="code")]),
        "routing.teachers.prose: 'poetry' is not a teacher — use one of code, prose": dict(
            base, routing={"column": "domain", "teachers": {"code": "code", "prose": "poetry"}}),
        "routing.default: 'nobody' is not a teacher": dict(
            base, routing={"column": "domain", "teachers": {"code": "code"}, "default": "nobody"}),
        "teachers[0].weight: 0.0 is not positive": dict(base, teachers=[dict(base["teachers"][0], weight=0),
                                                                         base["teachers"][1]]),
        "targets.format: topk cannot hold a mixture of teachers": dict(base, targets={"format": "topk"}),
        "compare_single_teacher: 'nobody' is not a teacher — use one of code, prose": dict(
            base, compare_single_teacher="nobody"),
        "routing: set without teachers:": {k: v for k, v in dict(base, teacher={"model": str(models / "code")}).items()
                                          if k != "teachers"},
    }
    for want, d in cases.items():
        with pytest.raises(ConfigError) as e:
            Config.from_dict(d)
        assert want in str(e.value), (want, str(e.value))


def test_mismatched_vocabulary_refused_before_ray(models, corpus, tmp_path, monkeypatch):
    d = _config(models, corpus, tmp_path / "v")
    d["teachers"][1]["model"] = str(models / "other-vocab")
    msg = _refused(d, monkeypatch)
    assert "teachers[1].model" in msg and str(models / "other-vocab") in msg and str(models / "code") in msg
    assert "one tokenizer" in msg


def test_missing_routing_column_refused_before_ray(models, corpus, tmp_path, monkeypatch):
    d = _config(models, corpus, tmp_path / "c")
    d["routing"] = dict(d["routing"], column="domian")
    msg = _refused(d, monkeypatch)
    assert "routing.column: column 'domian' is not in" in msg and "domain" in msg


def test_unmapped_values_refused_before_ray(models, corpus, tmp_path, monkeypatch):
    d = _config(models, corpus, tmp_path / "u")
    d["routing"] = {"column": "domain", "teachers": {"code": "code", "prose": "prose"}}  # no default
    msg = _refused(d, monkeypatch)
    assert "routing.teachers: 40 row(s) of column 'domain' have values no teacher is named for ('misc')" in msg
    assert "routing.default" in msg


def test_shipped_two_teachers_config():
    from raydistill.config import load_config

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "two_teachers.yaml")
    cfg = load_config(path)
    assert [t.name for t in cfg.teachers] == ["code", "prose"] and cfg.teacher.model == cfg.teachers[0].model
    assert [t.weight for t in cfg.teachers] == [0.6, 0.4] and cfg.routing.default == "mixture"
    assert all(t.resources == {"teacher_node": 1} for t in cfg.teachers) and cfg.teachers[0].replicas == 2
    assert "teacher" not in cfg.to_dict() and Config.from_dict(cfg.to_dict(), check_paths=False) == cfg
    lines = open(path, encoding="utf-8").read().splitlines()
    assert lines[0].startswith("#") and any("jobs/distill.py" in ln for ln in lines[:12])
    assert all("#" in ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#"))
