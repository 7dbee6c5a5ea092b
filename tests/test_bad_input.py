"""Bad input catalogue: every mistake is refused with a message naming the key / file / model and,
where there is one, the fix — before any Ray work, leaving an existing output directory untouched.

Each case prepares what it needs (model dirs, corpora, an existing store) inside a run directory
that already holds outputs of an earlier run, then calls the check a run calls first
(`config.load_config`, `pipeline.preflight`, `data.resolve_corpus`, `pipeline.open_store`,
`data.build_inputs`' store check) with Ray's entry points patched to fail the test if touched.
The output directory is digested (paths, modes, bytes) before and after.

Rows with empty or non-UTF-8 text are *skipped and counted* (`skipped_rows` in build_inputs'
result and in report.json["inputs"]); a corpus with no usable row is refused. Those two cases
need the Ray Data tokenize stage and are marked slow.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raydistill import pipeline
from raydistill.config import load_config
from raydistill.data import build_inputs, resolve_corpus
from raydistill.errors import ConfigError, ModelError, RaydistillError, StoreError

import tiny


# ---------------------------------------------------------------- harness

def tree_digest(root) -> str:
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        h.update(f"D {os.path.relpath(d, root)} {stat.S_IMODE(os.stat(d).st_mode):o}\n".encode())
        for f in sorted(files):
            p = os.path.join(d, f)
            h.update(f"F {os.path.relpath(p, root)} {stat.S_IMODE(os.stat(p).st_mode):o}\n".encode())
            with open(p, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


class Ctx:
    """Paths and config helpers of one case."""

    def __init__(self, tmp_path, tiny_dir, corpus):
        self.tmp, self.models, self.corpus = tmp_path, tiny_dir, corpus
        self.teacher = str(tiny_dir / "gpt2-teacher")
        self.out = tmp_path / "run"
        # outputs of an earlier run that must survive every refused run
        (self.out / "student").mkdir(parents=True)
        (self.out / "report.json").write_text(json.dumps({"train": {"steps": 12}}))
        (self.out / "student" / "config.json").write_text("{}")
        (self.out / "checkpoints").mkdir()
        with open(self.teacher + "/config.json") as f:
            self.vocab = json.load(f)["vocab_size"]

    def overrides(self, *extra) -> list[str]:
        return [f"teacher.model={self.teacher}", "student.init_from_teacher={n_layer: 1}",
                f"data.path={self.corpus}", "data.seq_len=16", "targets.format=topk", "targets.k=8",
                f"run.output_dir={self.out}", *extra]

    def cfg(self, *extra):
        return load_config(None, self.overrides(*extra))

    def other_vocab_model(self) -> str:
        path = self.tmp / "other-model"
        if not path.exists():
            tok = tiny.make_tokenizer(str(self.tmp / "other-tok"), tiny.corpus_texts(50, seed=9), vocab_size=300)
            tiny.make_gpt2(str(path), tok)
        return str(path)

    def pickle_model(self) -> str:
        """A teacher whose weights exist only as a torch.save'd state dict (pytorch_model.bin)."""
        path = self.tmp / "pickle-model"
        if not path.exists():
            path.mkdir()
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.teacher)
            torch.save(model.state_dict(), path / "pytorch_model.bin")
            for f in os.listdir(self.teacher):
                if not f.endswith(".safetensors"):
                    shutil.copy(os.path.join(self.teacher, f), path / f)
        return str(path)

    def remote_code_model(self) -> str:
        """A model directory whose config names custom code (auto_map + a model_type transformers lacks)."""
        d = self.tmp / "remote-code-model"
        if not d.exists():
            d.mkdir()
            (d / "config.json").write_text(json.dumps({
                "model_type": "mystery-lm", "vocab_size": self.vocab,
                "auto_map": {"AutoConfig": "configuration_mystery.MysteryConfig",
                             "AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"}}))
            (d / "model.safetensors").write_bytes(b"")
        return str(d)

    def existing_store(self, *extra):
        """A store written by an earlier run with this config (no Ray: open_store only)."""
        cfg = self.cfg(*extra)
        return pipeline.open_store(cfg, pipeline.preflight(cfg))

    def corpus_dir(self, name: str, files: dict) -> str:
        d = self.tmp / name
        d.mkdir()
        for fname, content in files.items():
            p = d / fname
            if isinstance(content, pa.Table):
                pq.write_table(content, p)
            else:
                p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(d)


CASES = {}


def case(name):
    def register(fn):
        CASES[name] = fn
        return fn
    return register


# Each case: ctx -> (the call that must refuse, exception type, fragments its message must contain).

@case("unknown config key")
def _(c):
    return lambda: c.cfg("train.lrr=0.1"), ConfigError, ["train.lrr", "unknown key", "did you mean 'lr'"]


@case("unknown section")
def _(c):
    return lambda: c.cfg("trainer.lr=0.1"), ConfigError, ["trainer", "unknown key", "did you mean 'train'"]


@case("wrong type")
def _(c):
    return (lambda: c.cfg("train.batch_size=many"), ConfigError,
            ["train.batch_size", "expected an integer", "'many'", "e.g. train.batch_size="])


@case("refresh.fraction outside [0, 1]")
def _(c):
    return (lambda: c.cfg("refresh.policy=round_robin", "refresh.fraction=1.5"), ConfigError,
            ["refresh.fraction", "1.5", "outside [0, 1]"])


@case("data.eval_fraction of 1")
def _(c):
    return lambda: c.cfg("data.eval_fraction=1"), ConfigError, ["data.eval_fraction", "outside [0, 1)"]


@case("targets.k larger than the vocabulary")
def _(c):
    return (lambda: pipeline.preflight(c.cfg("targets.k=5000")), ModelError,
            ["targets.k", "5000", f"vocabulary ({c.vocab})", c.teacher, f"targets.k<={c.vocab}"])


@case("seq_len above the model's maximum positions")
def _(c):
    return (lambda: pipeline.preflight(c.cfg("data.seq_len=100")), ModelError,
            ["data.seq_len", "100", "maximum of 64", c.teacher, "data.seq_len<=64"])


@case("seq_len above the student's maximum positions")
def _(c):
    small = c.tmp / "short-student"
    tok = tiny.make_tokenizer(str(c.tmp / "tok-same"))   # the same training data: the same vocabulary
    tiny.make_gpt2(str(small), tok, n_layer=1, n_embd=16, n_positions=32)
    cfg = c.cfg("data.seq_len=48", "student.init_from_teacher=null", f"student.model={small}")
    return (lambda: pipeline.preflight(cfg), ModelError,
            ["data.seq_len", "48", "student's maximum of 32", str(small), "data.seq_len<=32"])


@case("seq_len below 2")
def _(c):
    return lambda: c.cfg("data.seq_len=1"), ConfigError, ["data.seq_len", "at least 2"]


@case("missing teacher model path")
def _(c):
    path = c.tmp / "no-such-model"
    return (lambda: c.cfg(f"teacher.model={path}"), ConfigError,
            ["teacher.model", str(path), "does not exist", "hub id"])


@case("teacher.model unset")
def _(c):
    return (lambda: load_config(None, [f"data.path={c.corpus}", "student.init_from_teacher={n_layer: 1}"]),
            ConfigError, ["teacher.model: missing"])


@case("model directory without config.json")
def _(c):
    d = c.tmp / "weights-only"
    d.mkdir()
    shutil.copy(os.path.join(c.teacher, "model.safetensors"), d / "model.safetensors")
    return (lambda: pipeline.preflight(c.cfg(f"teacher.model={d}")), ModelError,
            ["teacher.model", str(d), "no config.json", "save_pretrained"])


@case("model directory without weights")
def _(c):
    d = c.tmp / "config-only"
    d.mkdir()
    shutil.copy(os.path.join(c.teacher, "config.json"), d / "config.json")
    return (lambda: pipeline.preflight(c.cfg(f"teacher.model={d}")), ModelError,
            ["teacher.model", str(d), "no weight files"])


@case("teacher with only pickle weights")
def _(c):
    path = c.pickle_model()
    return (lambda: pipeline.preflight(c.cfg(f"teacher.model={path}")), ModelError,
            ["teacher.model", path, "pytorch_model.bin", "only pickle weights", "safetensors",
             "teacher.allow_pickle_weights=true", "weights_only=True"])


@case("student with only pickle weights")
def _(c):
    path = c.pickle_model()
    cfg = c.cfg("student.init_from_teacher=null", f"student.model={path}")
    return (lambda: pipeline.preflight(cfg), ModelError,
            ["student.model", path, "only pickle weights", "safetensors"])


@case("model needing trust_remote_code")
def _(c):
    d = c.remote_code_model()
    return (lambda: pipeline.preflight(c.cfg(f"teacher.model={d}")), ModelError,
            ["teacher.model", d, "trust_remote_code", "teacher.trust_remote_code=true"])


@case("student needing trust_remote_code")
def _(c):
    d = c.remote_code_model()
    cfg = c.cfg("student.init_from_teacher=null", f"student.model={d}")
    return (lambda: pipeline.preflight(cfg), ModelError,
            ["student.model", d, "trust_remote_code", "not supported", "student.init_from_teacher"])


@case("teacher/student vocabulary mismatch")
def _(c):
    other = c.other_vocab_model()
    cfg = c.cfg("student.init_from_teacher=null", f"student.model={other}")
    return (lambda: pipeline.preflight(cfg), ModelError,
            ["student.model", c.teacher, other, "vocabulary", "student.init_from_teacher"])


@case("a student head narrower than the tokenizer")
def _(c):
    path = c.tmp / "narrow-head"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(c.models / "gpt2-student"))
    model.resize_token_embeddings(c.vocab - 8)  # same tokenizer, 8 ids without a logit
    model.save_pretrained(str(path))
    AutoTokenizer.from_pretrained(str(c.models / "gpt2-student")).save_pretrained(str(path))
    cfg = c.cfg("student.init_from_teacher=null", f"student.model={path}")
    return (lambda: pipeline.preflight(cfg), ModelError,
            ["student.model", str(path), f"output layer of {c.vocab - 8} rows", f"{c.vocab} tokens"])


@case("student with neither model nor init_from_teacher")
def _(c):
    return (lambda: c.cfg("student.init_from_teacher=null"), ConfigError,
            ["student", "neither student.model nor student.init_from_teacher", "n_layer"])


@case("student with both model and init_from_teacher")
def _(c):
    return (lambda: c.cfg(f"student.model={c.teacher}"), ConfigError,
            ["both student.model and student.init_from_teacher"])


@case("init_from_teacher with an unknown field")
def _(c):
    cfg = c.cfg("student.init_from_teacher={n_layer: 1, n_wings: 2}")
    return (lambda: pipeline.preflight(cfg), ModelError,
            ["student.init_from_teacher.n_wings", "GPT2Config has no such field", "n_layer"])


@case("samples above 255")
def _(c):
    return (lambda: c.cfg("targets.format=sampled", "targets.samples=300"), ConfigError,
            ["targets.samples", "300", "uint8", "1 to 255"])


@case("reverse_kl with sampled targets")
def _(c):
    return (lambda: c.cfg("targets.format=sampled", "train.loss=reverse_kl"), ConfigError,
            ["train.loss", "reverse_kl", "targets.format=topk"])


@case("negative learning rate")
def _(c):
    return lambda: c.cfg("train.lr=-0.001"), ConfigError, ["train.lr", "-0.001", "not positive", "train.lr=3e-4"]


@case("every problem reported together")
def _(c):
    def call():
        try:
            c.cfg("train.lr=-1", "targets.samples=0", "data.seq_len=many", "bogus.key=1")
        except ConfigError as e:
            assert len(e.errors) == 4, e.errors
            raise
    return call, ConfigError, ["train.lr", "targets.samples", "data.seq_len", "bogus"]


@case("config file that is not YAML")
def _(c):
    p = c.tmp / "bad.yaml"
    p.write_text("teacher: {model: gpt2\ntrain: [")
    return lambda: load_config(str(p)), ConfigError, [str(p), "not valid YAML", "fix the syntax"]


@case("empty corpus file (no rows)")
def _(c):
    p = c.tmp / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), p)
    return (lambda: pipeline.preflight(c.cfg(f"data.path={p}")), ConfigError,
            ["data.path", str(p), "no rows", "all empty"])


@case("empty corpus directory of blank JSONL files")
def _(c):
    d = c.corpus_dir("blank-jsonl", {"a.jsonl": "", "b.jsonl": "\n\n"})
    return (lambda: pipeline.preflight(c.cfg(f"data.path={d}")), ConfigError,
            ["data.path", d, "no rows", "2 file(s)"])


@case("missing text column")
def _(c):
    return (lambda: pipeline.preflight(c.cfg("data.text_column=body")), ConfigError,
            ["data.text_column", "'body'", str(c.corpus), "columns: text"])


@case("missing text column (JSONL)")
def _(c):
    d = c.corpus_dir("jsonl", {"part-0.jsonl": '{"content": "a b c"}\n'})
    return (lambda: resolve_corpus(c.cfg(f"data.path={d}").data), ConfigError,
            ["data.text_column", "'text'", "part-0.jsonl", "columns: content"])


@case("data.path that does not exist")
def _(c):
    p = c.tmp / "no-corpus-here"
    return (lambda: pipeline.preflight(c.cfg(f"data.path={p}")), ConfigError,
            ["data.path", str(p), "does not exist"])


@case("data.path unset")
def _(c):
    return lambda: resolve_corpus(c.cfg("data.path=null").data), ConfigError, ["data.path: missing"]


@case("corpus directory with no parquet/jsonl files")
def _(c):
    d = c.corpus_dir("texts", {"notes.txt": "hello", "data.csv": "text\nhello\n"})
    return (lambda: pipeline.preflight(c.cfg(f"data.path={d}")), ConfigError,
            ["data.path", "no .parquet or .jsonl files", d])


@case("corpus mixing Parquet and JSONL")
def _(c):
    d = c.corpus_dir("mixed", {"a.parquet": pa.table({"text": ["x y"]}), "b.jsonl": '{"text": "x"}\n'})
    return (lambda: pipeline.preflight(c.cfg(f"data.path={d}")), ConfigError,
            ["data.path", d, "mixes Parquet and JSONL", "one format"])


@case("corpus file that is not Parquet")
def _(c):
    d = c.corpus_dir("garbage", {"part-0.parquet": b"PAR1 this is not parquet"})
    return (lambda: pipeline.preflight(c.cfg(f"data.path={d}")), ConfigError,
            ["data.path", "part-0.parquet", "not a readable Parquet file"])


@case("JSONL line that is not an object")
def _(c):
    d = c.corpus_dir("jsonl-list", {"a.jsonl": '["just", "a", "list"]\n'})
    return (lambda: pipeline.preflight(c.cfg(f"data.path={d}")), ConfigError,
            ["data.path", "a.jsonl", "not a JSON object"])


@case("store from another run with another format")
def _(c):
    store = c.existing_store()                                    # topk, k=8
    cfg = c.cfg("targets.format=sampled")
    return (lambda: pipeline.open_store(cfg, pipeline.preflight(cfg)), StoreError,
            [store.uri, '"format": "topk"', '"format": "sampled"', "another targets.store", "delete"])


@case("store from another run with another k")
def _(c):
    store = c.existing_store()
    cfg = c.cfg("targets.k=4")
    return (lambda: pipeline.open_store(cfg, pipeline.preflight(cfg)), StoreError,
            [store.uri, '"k": 8', '"k": 4'])


@case("store from another run with another tokenizer")
def _(c):
    store = c.existing_store()
    other = c.other_vocab_model()
    cfg = c.cfg(f"teacher.model={other}")
    return (lambda: pipeline.open_store(cfg, pipeline.preflight(cfg)), StoreError,
            [store.uri, "tokenizer", c.teacher, other, "another targets.store"])


@case("store built from another corpus")
def _(c):
    store = c.existing_store()
    store.record_inputs({"00000": {"input": "inputs/train/00000.parquet", "rows": 3}}, None,
                        {"fingerprint": "sha256:elsewhere", "data_path": "/data/other.parquet", "seq_len": 16})
    cfg = c.cfg()
    return (lambda: build_inputs(cfg, pipeline.open_store(cfg, pipeline.preflight(cfg)), pipeline.preflight(cfg)),
            StoreError, ["targets.store", store.uri, "another corpus", "/data/other.parquet", str(c.corpus)])


@case("store whose manifest is damaged")
def _(c):
    store = c.existing_store()
    with open(os.path.join(store.uri, "manifest.json"), "w") as f:
        f.write('{"format_version": 1, "tok')
    cfg = c.cfg()
    return (lambda: pipeline.open_store(cfg, pipeline.preflight(cfg)), StoreError,
            ["manifest.json", "not valid JSON", f"delete {store.uri}"])


@case("unwritable output directory")
def _(c):
    locked = c.out / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    target = locked / "new-run"
    if os.access(locked, os.W_OK):
        # root ignores the mode bits: make the parent a regular file instead
        target = c.out / "report.json" / "new-run"
    cfg = c.cfg(f"run.output_dir={target}")
    return (lambda: pipeline.preflight(cfg), ConfigError,
            ["run.output_dir", str(target), "cannot write", "run.output_dir="])


# ---------------------------------------------------------------- the catalogue

@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the check under test starts Ray or any Ray Data work."""
    import ray
    import ray.data

    def forbidden(*a, **k):
        raise AssertionError("Ray work started before the bad input was refused")

    for mod, name in ((ray, "init"), (ray, "remote"), (ray.data, "read_parquet"), (ray.data, "read_json"),
                      (ray.data, "from_items")):
        monkeypatch.setattr(mod, name, forbidden)


def test_catalogue_is_large():
    assert len(CASES) >= 20


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_refused(name, tmp_path, tiny_dir, tiny_corpus, no_ray):
    ctx = Ctx(tmp_path, tiny_dir, tiny_corpus)
    try:
        call, exc, fragments = CASES[name](ctx)
        before = tree_digest(ctx.out)
        with pytest.raises(exc) as ei:
            call()
        msg = str(ei.value)
        assert isinstance(ei.value, RaydistillError)
        missing = [f for f in fragments if f not in msg]
        assert not missing, f"message lacks {missing}:\n{msg}"
        assert " — " in msg or "\n" in msg, f"no fix given:\n{msg}"       # `what — how to fix`
        assert tree_digest(ctx.out) == before, "a refused run changed the existing outputs"
    finally:
        for d, _, _ in os.walk(ctx.out):
            os.chmod(d, 0o755)


def test_pickle_weights_allowed_load_with_weights_only(tmp_path, tiny_dir, tiny_corpus, monkeypatch):
    """teacher.allow_pickle_weights=true lets the pickle-only teacher through, loaded weights_only."""
    from raydistill.models import load_causal_lm

    ctx = Ctx(tmp_path, tiny_dir, tiny_corpus)
    path = ctx.pickle_model()
    cfg = ctx.cfg(f"teacher.model={path}", "teacher.allow_pickle_weights=true")
    info = pipeline.preflight(cfg)
    assert info.vocab_size == ctx.vocab
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = load_causal_lm(path, allow_pickle_weights=True)
    assert calls and all(c is True for c in calls), calls
    ref = load_causal_lm(ctx.teacher)
    x = torch.randint(0, ctx.vocab, (1, 8))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, ref(input_ids=x).logits, atol=1e-6)


# ---------------------------------------------------------------- rows that need the tokenize stage (Ray)

def _binary_corpus(path, values) -> str:
    pq.write_table(pa.table({"text": pa.array(values, pa.binary())}), path)
    return str(path)


@pytest.mark.slow
def test_empty_and_non_utf8_rows_skipped_and_counted(ray_session, tmp_path, tiny_dir):
    good = [t.encode() for t in tiny.corpus_texts(60, seed=4)]
    bad = [b"", b"   ", b"\xff\xfe\xfa broken", None, b"\xc3\x28"]     # empty, blank, 2 x invalid UTF-8, null
    values = [v for pair in zip(good, bad * 12) for v in pair]           # interleaved: 60 good + 60 bad
    corpus = _binary_corpus(tmp_path / "mixed.parquet", values)
    ctx = Ctx(tmp_path, tiny_dir, corpus)
    cfg = ctx.cfg("targets.shard_rows=16", "data.eval_fraction=0", f"targets.store={tmp_path / 'store'}")
    info = pipeline.preflight(cfg)
    store = pipeline.open_store(cfg, info)
    res = build_inputs(cfg, store, info)
    assert res["skipped_rows"] == 60 and res["docs"] == 60
    # the usable rows gave exactly the sequences the good texts alone give
    clean = _binary_corpus(tmp_path / "clean.parquet", good)
    cfg2 = Ctx(tmp_path / "c2", tiny_dir, clean).cfg("targets.shard_rows=16", "data.eval_fraction=0",
                                                     f"targets.store={tmp_path / 'store2'}")
    res2 = build_inputs(cfg2, pipeline.open_store(cfg2, info), info)
    assert res2["skipped_rows"] == 0 and res["train_rows"] == res2["train_rows"] > 0


@pytest.mark.slow
def test_corpus_of_only_empty_rows_refused(ray_session, tmp_path, tiny_dir):
    corpus = _binary_corpus(tmp_path / "blank.parquet", [b"", b"  ", b"\xff\xff", None] * 10)
    ctx = Ctx(tmp_path, tiny_dir, corpus)
    cfg = ctx.cfg(f"targets.store={tmp_path / 'store'}")
    info = pipeline.preflight(cfg)
    store = pipeline.open_store(cfg, info)
    before = tree_digest(ctx.out)
    with pytest.raises(ConfigError) as ei:
        build_inputs(cfg, store, info)
    msg = str(ei.value)
    assert "data.path" in msg and corpus in msg and "0 usable rows" in msg and "40 skipped" in msg
    assert "add text or lower data.seq_len" in msg
    assert not store.has_inputs() and tree_digest(ctx.out) == before
