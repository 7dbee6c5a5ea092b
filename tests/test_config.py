"""Config: defaults, YAML + override layering, one ConfigError listing every problem, shipped configs."""
from __future__ import annotations

import os
import pickle

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raydistill.config import Config, load_config
from raydistill.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VALID = {"teacher": {"model": "gpt2"}, "student": {"init_from_teacher": {"n_layer": 2}}}


def errors_of(**kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(base=VALID, **kwargs)
    return info.value.errors


def one_error(overrides, key) -> str:
    errs = errors_of(overrides=overrides)
    hits = [e for e in errs if e.startswith(key + ":")]
    assert len(hits) == 1, errs
    assert " — " in hits[0]  # every message says what and how to fix
    return hits[0]


def test_defaults_and_round_trip():
    cfg = load_config(base=VALID)
    assert cfg.run.name == "distill" and cfg.run.output_dir == "runs/distill" and cfg.run.seed == 0
    assert cfg.data.seq_len == 128 and cfg.data.eval_fraction == 0.05 and cfg.data.max_rows is None
    assert cfg.teacher.dtype == "float32" and cfg.teacher.replicas == 1 and cfg.teacher.resources == {}
    assert cfg.teacher.trust_remote_code is False and cfg.teacher.allow_pickle_weights is False
    assert (cfg.targets.format, cfg.targets.k, cfg.targets.samples) == ("sampled", 32, 50)
    assert (cfg.targets.shard_rows, cfg.targets.keep_versions, cfg.targets.store) == (256, 2, None)
    assert cfg.train.workers == 2 and cfg.train.lr == 1e-3 and cfg.train.loss == "forward_kl"
    assert cfg.train.temperature_schedule.kind == "constant" and cfg.train.temperature_schedule.start is None
    assert (cfg.train.checkpoint_every, cfg.train.max_failures, cfg.train.online) == (50, 2, False)
    assert (cfg.refresh.policy, cfg.refresh.fraction, cfg.refresh.source) == ("none", 0.0, "teacher")
    assert cfg.refresh.max_replicas == 1
    d = cfg.to_dict()
    assert Config.from_dict(d) == cfg and Config.from_dict(d).to_dict() == d
    assert Config.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    with pytest.raises(ConfigError, match="teacher.model: missing"):
        Config().validate()


def test_to_dict_does_not_alias():
    cfg = load_config(base=VALID, overrides=["teacher.resources.teacher_node=1"])
    d = cfg.to_dict()
    d["teacher"]["resources"]["x"] = 5
    d["student"]["init_from_teacher"]["n_layer"] = 9
    assert cfg.teacher.resources == {"teacher_node": 1.0}
    assert cfg.student.init_from_teacher == {"n_layer": 2}


def test_yaml_then_overrides_precedence(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("run: {name: from-yaml, seed: 3}\ntrain: {lr: 0.01, temperature_schedule: {kind: linear}}\n")
    base = {**VALID, "run": {"name": "from-base", "output_dir": "out"}, "train": {"lr": 0.5, "epochs": 4}}
    # (topk: a temperature schedule needs re-temperable targets; sampled ones are refused)
    cfg = load_config(str(p), ["train.lr=3e-4", "run.seed=7", "train.temperature_schedule.end=2", "targets.format=topk",
                               "data.max_rows=null", "teacher.resources.teacher_node=1"], base=base)
    assert cfg.run.name == "from-yaml" and cfg.run.output_dir == "out"  # yaml over base, base kept
    assert cfg.run.seed == 7 and cfg.train.lr == 3e-4 and cfg.train.epochs == 4
    assert cfg.train.temperature_schedule.kind == "linear" and cfg.train.temperature_schedule.end == 2.0
    assert isinstance(cfg.train.temperature_schedule.end, float)
    assert cfg.teacher.resources == {"teacher_node": 1.0}
    cfg = load_config(base=VALID, overrides=["run.name=2024", "data.path=null", "data.max_rows=5",
                                              "student.init_from_teacher.copy_layers=true"])
    assert cfg.run.name == "2024" and cfg.data.path is None and cfg.data.max_rows == 5
    assert cfg.student.init_from_teacher == {"n_layer": 2, "copy_layers": True}
    # a YAML null in the file removes what base set
    p.write_text("student: {init_from_teacher: null, model: distilgpt2}\n")
    assert load_config(str(p), base=VALID).student.model == "distilgpt2"


@pytest.mark.parametrize("override,key,fragment", [
    ("train.lr=fast", "train.lr", "expected a number, got 'fast' (str)"),
    ("train.lr=true", "train.lr", "expected a number"),
    ("train.workers=1.5", "train.workers", "expected an integer"),
    ("train.workers=true", "train.workers", "expected an integer"),
    ("train.use_gpu=1", "train.use_gpu", "expected true or false"),
    ("data.path=[a, b]", "data.path", "expected a string"),
    ("train.lr=.inf", "train.lr", "expected a number"),
    ("teacher.resources=[1]", "teacher.resources", "expected a mapping"),
    ("teacher.resources.gpu_a=many", "teacher.resources.gpu_a", "expected a number"),
    ("teacher.resources.gpu_a=-1", "teacher.resources.gpu_a", "is negative"),
    ("train.temperature_schedule=3", "train.temperature_schedule", "expected a mapping"),
    ("refresh.fraction=1.5", "refresh.fraction", "1.5 is outside [0, 1] — use a fraction between 0 and 1"),
    ("data.seq_len=1", "data.seq_len", "is below 2"),
    ("data.eval_fraction=1", "data.eval_fraction", "outside [0, 1)"),
    ("data.max_rows=0", "data.max_rows", "is below 1"),
    ("teacher.replicas=0", "teacher.replicas", "is below 1"),
    ("teacher.cpus_per_replica=0", "teacher.cpus_per_replica", "is not positive"),
    ("teacher.gpus_per_replica=-1", "teacher.gpus_per_replica", "is below 0"),
    ("teacher.batch_size=0", "teacher.batch_size", "is below 1"),
    ("teacher.dtype=fp16", "teacher.dtype", "is not one of float32, bfloat16, float16"),
    ("student.dtype=half", "student.dtype", "is not one of"),
    ("targets.format=dense", "targets.format", "is not one of sampled, topk"),
    ("targets.k=0", "targets.k", "is below 1"),
    ("targets.samples=256", "targets.samples", "uint8"),
    ("targets.samples=0", "targets.samples", "outside [1, 255]"),
    ("targets.capture_temperature=0", "targets.capture_temperature", "is not positive"),
    ("targets.shard_rows=0", "targets.shard_rows", "is below 1"),
    ("targets.keep_versions=0", "targets.keep_versions", "is below 1"),
    ("train.workers=-1", "train.workers", "is below 0"),
    ("train.epochs=0", "train.epochs", "is below 1"),
    ("train.max_steps=0", "train.max_steps", "is below 1"),
    ("train.batch_size=0", "train.batch_size", "is below 1"),
    ("train.lr=0", "train.lr", "is not positive"),
    ("train.alpha=1.1", "train.alpha", "outside [0, 1]"),
    ("train.temperature=0", "train.temperature", "is not positive"),
    ("train.jsd_beta=1", "train.jsd_beta", "outside (0, 1)"),
    ("train.jsd_beta=0", "train.jsd_beta", "outside (0, 1)"),
    ("train.checkpoint_every=0", "train.checkpoint_every", "is below 1"),
    ("train.max_failures=-2", "train.max_failures", "is below -1"),
    ("train.loss=kl", "train.loss", "is not one of forward_kl"),
    ("train.temperature_schedule.kind=step", "train.temperature_schedule.kind", "is not one of"),
    ("train.temperature_schedule.start=-1", "train.temperature_schedule.start", "is not positive"),
    ("refresh.every_steps=0", "refresh.every_steps", "is below 1"),
    ("refresh.policy=lru", "refresh.policy", "is not one of none, round_robin, random"),
    ("refresh.source=student", "refresh.source", "is not one of teacher, resample, on_policy"),
    ("refresh.max_replicas=0", "refresh.max_replicas", "is below 1"),
    ("train.bogus=1", "train.bogus", "unknown key — known keys of train:"),
    ("bogus.x=1", "bogus", "unknown key"),
])
def test_each_problem_names_its_key(override, key, fragment):
    assert fragment in one_error([override], key)


def test_valid_edges_accepted():
    cfg = load_config(base=VALID, overrides=[
        "train.workers=0", "train.max_failures=-1", "targets.samples=255", "targets.samples=1",
        "refresh.fraction=1", "refresh.policy=random", "data.eval_fraction=0", "train.lr=1",
        "teacher.gpus_per_replica=0.5", "train.alpha=0", "teacher.dtype=bfloat16"])
    assert cfg.train.workers == 0 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.targets.samples == 1 and cfg.refresh.fraction == 1.0


def test_did_you_mean():
    assert "did you mean 'lr'?" in one_error(["train.lrr=1"], "train.lrr")
    assert "did you mean 'teacher'?" in one_error(["taecher.model=x"], "taecher")
    assert "did you mean 'cosine'?" in one_error(["train.temperature_schedule.kind=cosin"],
                                                 "train.temperature_schedule.kind")
    assert "did you mean" not in one_error(["train.zzzzzz=1"], "train.zzzzzz")


def test_many_problems_reported_together(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: fast\n  bogus: 1\nrefresh:\n  fraction: 1.5\nstudent: {model: null}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(p), ["data.seq_len=1", "oops"], base=VALID)
    errs = info.value.errors
    assert len(errs) >= 5, errs
    for key in ("train.lr", "train.bogus", "refresh.fraction", "data.seq_len", "'oops'"):
        assert any(e.startswith(key + ":") for e in errs), (key, errs)
    assert "train.lr: expected a number, got 'fast' (str) — e.g. train.lr=" in str(info.value)
    assert pickle.loads(pickle.dumps(info.value)).errors == errs  # crosses Ray processes


def test_cross_field_rules(tmp_path):
    assert "missing — set it to a local model directory" in errors_of(
        overrides=["teacher.model=null"])[0]
    assert "neither student.model nor student.init_from_teacher" in one_error(
        ["student.init_from_teacher=null"], "student")
    assert "both student.model and student.init_from_teacher" in one_error(
        ["student.model=gpt2"], "student")
    msg = one_error(["train.loss=jsd"], "train.loss")
    assert "targets.format=topk" in msg and "tail" in msg
    load_config(base=VALID, overrides=["train.loss=tvd", "targets.format=topk"])
    load_config(base=VALID, overrides=["train.loss=reverse_kl", "train.online=true"])
    assert "refreshes nothing" in one_error(["refresh.policy=round_robin"], "refresh.fraction")
    assert "set refresh.policy=round_robin" in one_error(["refresh.fraction=0.5"], "refresh.policy")
    for source in ("teacher", "resample", "on_policy"):
        for fmt in ("sampled", "topk"):
            load_config(base=VALID, overrides=[f"refresh.source={source}", f"targets.format={fmt}"])
    assert "copy_layers" in one_error(["student.init_from_teacher.copy_layers=3"],
                                      "student.init_from_teacher.copy_layers")


def test_model_paths(tmp_path):
    model_dir = tmp_path / "teacher"
    model_dir.mkdir()
    (tmp_path / "file").write_text("x")
    cfg = load_config(base=VALID, overrides=[f"teacher.model={model_dir}"])
    assert cfg.teacher.model == str(model_dir)
    for hub in ("gpt2", "openai-community/gpt2-xl", "meta-llama/Llama-3.2-1B"):
        load_config(base=VALID, overrides=[f"teacher.model={hub}"])
    missing = tmp_path / "nope"
    assert str(missing) in one_error([f"teacher.model={missing}"], "teacher.model")
    assert "does not exist" in one_error(["teacher.model=./not/here"], "teacher.model")
    assert "does not exist" in one_error(["teacher.model=~/no-such-model-dir-xyz"], "teacher.model")
    assert "not a directory" in one_error([f"teacher.model={tmp_path / 'file'}"], "teacher.model")
    assert "neither an existing directory nor a hub id" in one_error(["teacher.model=a/b/c"], "teacher.model")
    assert "does not exist" in one_error(['teacher.model="~a\\0b"'], "teacher.model")  # NUL byte
    assert "does not exist" in one_error(
        ["student.init_from_teacher=null", f"student.model={missing}"], "student.model")
    # check_paths=False rebuilds a config where the paths are elsewhere (another node)
    d = load_config(base=VALID).to_dict()
    d["teacher"]["model"] = str(missing)
    assert Config.from_dict(d, check_paths=False).teacher.model == str(missing)


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "absent.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="not a mapping of sections"):
        load_config(str(bad))
    bad.write_text("train: 5\n")
    assert any(e.startswith("train: expected a mapping") for e in errors_of(path=str(bad)))
    bad.write_text("")  # an empty file is an empty config
    assert load_config(str(bad), base=VALID) == load_config(base=VALID)
    for item in ("noequals", "=3", ".a=1", "train..lr=1", "train.lr="):
        assert errors_of(overrides=[item]), item
    assert any(e.startswith("run.name: expected a string") for e in errors_of(overrides=["run.name.x=1"]))
    with pytest.raises(ConfigError, match="run.name is 'd', not a mapping"):
        load_config(base={**VALID, "run": {"name": "d"}}, overrides=["run.name.x=1"])
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        Config.from_dict([1, 2])


def test_mode_and_store_uri():
    cfg = load_config(base=VALID)
    assert cfg.mode == "cached" and cfg.store_uri == "runs/distill/targets"
    cfg = load_config(base=VALID, overrides=["refresh.policy=round_robin", "refresh.fraction=0.25",
                                             "run.output_dir=s3://b/runs/x/"])
    assert cfg.mode == "mixed" and cfg.store_uri == "s3://b/runs/x/targets"
    cfg = load_config(base=VALID, overrides=["train.online=true", "targets.store=gs://b/store"])
    assert cfg.mode == "online" and cfg.store_uri == "gs://b/store"


def test_shipped_configs():
    default = load_config(os.path.join(ROOT, "configs", "default.yaml"))
    assert default.teacher.model == "gpt2" and default.student.init_from_teacher == {"n_layer": 2}
    assert default.mode == "cached"
    # default.yaml documents every key with its default value
    expected = Config().to_dict()
    got = default.to_dict()
    for section, keys in expected.items():
        assert set(got[section]) == set(keys)
    got["teacher"]["model"], got["data"]["path"], got["student"]["init_from_teacher"] = None, None, None
    assert got == expected

    llama = load_config(os.path.join(ROOT, "configs", "llama3-8b-to-1b.yaml"))
    assert llama.teacher.model == "meta-llama/Meta-Llama-3-8B"
    assert llama.student.model == "meta-llama/Llama-3.2-1B" and llama.student.init_from_teacher is None
    assert llama.teacher.dtype == "bfloat16" and llama.teacher.gpus_per_replica == 1
    assert llama.teacher.replicas == 4 and llama.train.workers == 4 and llama.train.use_gpu
    assert llama.teacher.resources == {"teacher_node": 1} and llama.train.resources == {"student_node": 1}
    assert (llama.refresh.policy, llama.refresh.fraction, llama.mode) == ("round_robin", 0.25, "mixed")
    assert llama.store_uri.startswith("s3://") and llama.run.output_dir.startswith("s3://")

    gpt2 = load_config(os.path.join(ROOT, "configs", "gpt2xl-to-gpt2.yaml"))
    assert gpt2.teacher.model == "openai-community/gpt2-xl"
    assert gpt2.student.model == "openai-community/gpt2"


@pytest.mark.parametrize("name", ["default.yaml", "llama3-8b-to-1b.yaml", "gpt2xl-to-gpt2.yaml"])
def test_config_files_are_commented(name):
    lines = open(os.path.join(ROOT, "configs", name), encoding="utf-8").read().splitlines()
    header = [ln for ln in lines[:12] if ln.startswith("#")]
    assert lines[0].startswith("#") and any("jobs/distill.py" in ln for ln in header)
    for ln in lines:
        if ln.strip() and not ln.lstrip().startswith("#"):
            assert "#" in ln, f"uncommented key in {name}: {ln!r}"


# ---------------------------------------------------------------------------------------------
# property: whatever the input, the only failure is a ConfigError

SECTIONS = ["run", "data", "teacher", "targets", "student", "train", "refresh"]
KEYS = ["name", "seed", "path", "seq_len", "model", "dtype", "replicas", "resources", "format", "k",
        "samples", "init_from_teacher", "lr", "loss", "temperature_schedule", "kind", "start",
        "policy", "fraction", "copy_layers", "workers", "online", "max_steps", "bogus"]
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
           | st.sampled_from(["gpt2", "topk", "jsd", "round_robin", "/nope", "~", ".", "a/b", ""]))
keys = st.sampled_from(SECTIONS + KEYS) | st.text(max_size=6) | st.integers(-3, 3) | st.none()
values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3)
                      | st.dictionaries(keys, kids, max_size=3), max_leaves=6)
configs = st.dictionaries(keys, values, max_size=6) | st.dictionaries(
    st.sampled_from(SECTIONS), st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), values,
                                               max_size=5), max_size=7) | values
override_keys = st.lists(st.sampled_from(SECTIONS + KEYS) | st.text(max_size=5), min_size=0,
                         max_size=4).map(".".join)
overrides = st.lists(st.text(max_size=30) | st.builds(lambda k, v: f"{k}={v}", override_keys,
                                                      st.text(max_size=15)), max_size=5)


@settings(deadline=None, max_examples=200, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(d=configs, ov=overrides)
def test_arbitrary_input_raises_only_config_error(d, ov):
    for call in (lambda: Config.from_dict(d), lambda: load_config(overrides=ov, base=VALID),
                 lambda: load_config(overrides=ov, base=d if isinstance(d, dict) else None)):
        try:
            cfg = call()
        except ConfigError as e:
            assert e.errors and all(isinstance(m, str) and ": " in m for m in e.errors)
        else:
            assert isinstance(cfg, Config)
            assert Config.from_dict(cfg.to_dict()) == cfg
