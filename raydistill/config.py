"""Run configuration: typed keyword-only dataclasses, YAML as the stored form.

Sections (every key optional except ``teacher.model``; see ``configs/default.yaml``):

    task      causal_lm (default) | another name in raydistill.tasks.TASKS (a top-level key)
    run       name, output_dir, seed, compare_hard_labels, resource_wait_s
    data      path, format (text|chat|prompt_response), text_column, text_pair_column, label_column,
              messages_column, prompt_column, response_column, chat_template, loss_on (response|all),
              seq_len, eval_fraction, max_rows
    teacher   model, revision, dtype, replicas, cpus_per_replica, gpus_per_replica, batch_size,
              trust_remote_code, allow_pickle_weights, resources
    targets   format (sampled|topk|dense; unset: the task's default), k, samples, capture_temperature,
              store, shard_rows, keep_versions
    student   model | init_from_teacher, dtype
    train     workers, use_gpu, cpus_per_worker, resources, epochs, max_steps, batch_size, grad_accum,
              lr, weight_decay, warmup_ratio, warmup_steps, grad_clip, loss, jsd_beta, alpha, temperature,
              temperature_schedule {kind, start, end}, checkpoint_every, max_failures, online, log_every,
              fused_loss, loss_chunk_tokens, gradient_checkpointing, strategy (ddp|fsdp)
    refresh   policy (none|round_robin|random), fraction, every_steps, source, max_replicas, seed,
              max_age, enforce (wait|warn), max_stall_share
    generate  enabled, max_new_tokens, temperature (0: greedy), top_p, num_return_sequences,
              prompt_template, keep (teacher|both): teacher generation passes (generate_pass)
    rationale answer_prefix: where a response's answer starts (answer accuracy, data.answer_column)

``load_config(path, overrides, base)`` layers a base dict, a YAML file and ``key.sub=value``
overrides, then ``Config.from_dict`` checks types, values and cross-field rules and raises one
``ConfigError`` listing every problem (``key: what is wrong — how to fix``) before any Ray work.
A ``Config`` built by hand is not checked until ``cfg.validate()``.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Sequence

import yaml

from raydistill.errors import ConfigError
from raydistill.tasks import TASK_FORMATS, TASKS

DTYPES = ("float32", "bfloat16", "float16")
TARGET_FORMATS = ("sampled", "topk", "dense")  # dense: every class (sequence_classification)
LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd")
SCHEDULES = ("constant", "linear", "cosine")
# T / targets.capture_temperature that topk's stored tail grid covers (1 / targets.TAIL_BETAS ends).
TOPK_TEMPERATURE_RANGE = (0.5, 10.0)
REFRESH_POLICIES = ("none", "round_robin", "random")
REFRESH_SOURCES = ("teacher", "resample", "on_policy")
REFRESH_ENFORCE = ("wait", "warn")
DATA_FORMATS = ("text", "chat", "prompt_response")  # raydistill.instruct.FORMATS
LOSS_ON = ("response", "all")
GENERATE_KEEP = ("teacher", "both")
STRATEGIES = ("ddp", "fsdp")  # train.strategy: raydistill.sharding


@dataclass(kw_only=True)
class RunConfig:
    name: str = "distill"
    output_dir: str = "runs/distill"
    seed: int = 0
    compare_hard_labels: bool = False  # also train the same student on hard labels alone (alpha 0)
    resource_wait_s: float = 1800.0  # how long a phase waits for nodes an autoscaler is launching


@dataclass(kw_only=True)
class DataConfig:
    path: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None  # sequence_classification: second text of a pair (NLI)
    label_column: str | None = None      # sequence_classification: labels (names or ids); null: none
    # causal_lm input rows (raydistill.instruct): packed text, or examples with a loss mask
    format: str = "text"                 # text | chat | prompt_response
    messages_column: str = "messages"    # chat: a list of {role, content} per row
    prompt_column: str = "prompt"        # prompt_response
    response_column: str = "response"    # prompt_response
    chat_template: str | None = None     # chat: a Jinja template (text or a file path); null: the tokenizer's
    loss_on: str = "response"            # response: loss on response tokens only; all: on every token
    seq_len: int = 128
    eval_fraction: float = 0.05
    max_rows: int | None = None
    answer_column: str | None = None     # checkable answers: eval reports answer accuracy (generate_pass)


@dataclass(kw_only=True)
class TeacherConfig:
    model: str | None = None
    revision: str | None = None
    dtype: str = "float32"
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    batch_size: int = 8
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources, e.g. {teacher_node: 1}


# ---- several teachers (raydistill.teachers): `teachers:` instead of `teacher:`, `routing:` optional
MIXTURE = "mixture"  # routing.default: rows of unmapped values learn the weighted mixture of all teachers
TEACHER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # a name is part of shard ids (store.component_id)


@dataclass(kw_only=True)
class TeacherEntry(TeacherConfig):
    """One of several teachers: every teacher.* key, plus its name and its weight in a mixture."""
    name: str | None = None
    weight: float = 1.0


@dataclass(kw_only=True)
class RoutingConfig:
    column: str | None = None                             # the corpus column whose value picks the teacher
    teachers: dict[str, str] = field(default_factory=dict)  # {column value: teacher name}
    default: str | None = None                            # unmapped values: a teacher name, mixture, or refused


@dataclass(kw_only=True)
class TargetsConfig:
    format: str = "sampled"
    k: int = 32
    samples: int = 50
    capture_temperature: float = 1.0
    store: str | None = None  # None: <run.output_dir>/targets
    shard_rows: int = 256
    keep_versions: int = 2


@dataclass(kw_only=True)
class StudentConfig:
    model: str | None = None
    init_from_teacher: dict | None = None  # HF config overrides (n_layer, hidden_size, ...) + copy_layers
    dtype: str = "float32"


@dataclass(kw_only=True)
class TemperatureSchedule:
    kind: str = "constant"
    start: float | None = None  # None: train.temperature
    end: float | None = None  # None: train.temperature


@dataclass(kw_only=True)
class TrainConfig:
    workers: int = 2  # 0 runs the loop in-process (tests)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    resources: dict[str, float] = field(default_factory=dict)
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.03  # LR warmup as a share of the run's steps (Hugging Face's convention)
    warmup_steps: int | None = None  # set: this many warmup steps, and warmup_ratio is ignored (as in HF)
    grad_clip: float = 1.0
    loss: str = "forward_kl"
    jsd_beta: float = 0.5
    alpha: float = 0.5
    temperature: float = 1.0
    temperature_schedule: TemperatureSchedule = field(default_factory=TemperatureSchedule)
    checkpoint_every: int = 50
    max_failures: int = 2
    online: bool = False  # the teacher runs inside the step: the baseline mode
    log_every: int = 10
    # LM head + loss chunk by chunk (raydistill.chunked_loss), no [tokens, V] logits; None: on when a
    # micro-batch's logits exceed one chunk (bench row 9: 0.3x the step's peak at V=128k, no slower).
    fused_loss: bool | None = None
    loss_chunk_tokens: int | None = None  # tokens per chunk; None: about 2^23 logits per chunk
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward (long sequences)
    # ddp: a whole student per worker; fsdp: params, grads and AdamW state sharded over the workers
    # (torch FSDP2, raydistill.sharding) for students that do not fit one device with DDP.
    strategy: str = "ddp"


@dataclass(kw_only=True)
class RefreshConfig:
    policy: str = "none"
    fraction: float = 0.0
    every_steps: int = 50
    source: str = "teacher"
    max_replicas: int = 1  # cap on the refresh teacher pool (it grows up to this while training waits)
    seed: int = 0
    max_age: int | None = None  # staleness bound in student steps; None: ceil(1/fraction) x every_steps
    enforce: str = "wait"  # wait: training blocks before a step that would break max_age; warn: log only
    max_stall_share: float = 0.1  # stall share of the last passes above which the pool grows a replica


@dataclass(kw_only=True)
class GenerateConfig:
    """Teacher generation pass (raydistill.generate_pass): the teacher writes the responses."""
    enabled: bool = False
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    num_return_sequences: int = 1
    prompt_template: str | None = None  # e.g. "{prompt}\nLet's think step by step."; None: the prompt as is
    keep: str = "teacher"  # teacher: generated rows replace the dataset's responses; both: added to them


@dataclass(kw_only=True)
class RationaleConfig:
    answer_prefix: str | None = None  # e.g. "A:": the answer is the text after its last occurrence


@dataclass(kw_only=True)
class Config:
    task: str = "causal_lm"  # raydistill.tasks.TASKS: what the trainer, teacher pass and eval do
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    teachers: list[TeacherEntry] = field(default_factory=list)  # several teachers; `teacher` is then the first
    routing: RoutingConfig | None = None                          # which teacher teaches which row (teachers only)
    compare_single_teacher: str | None = None  # teachers: also train the same student from this teacher alone
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    rationale: RationaleConfig = field(default_factory=RationaleConfig)

    @classmethod
    def from_dict(cls, d: Any, *, check_paths: bool = True) -> "Config":
        """Build and check a Config; raise one ConfigError with every problem found."""
        return _parse(d, [], check_paths)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        # One of the two, as a config file has it: `teacher` is derived from teachers[0].
        d.pop("teacher" if self.teachers else "teachers")
        for key in ("routing", "compare_single_teacher"):  # unset: a one-teacher config's dict as it was
            if d[key] is None:
                d.pop(key)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self, *, check_paths: bool = True) -> "Config":
        """Check a Config built by hand; returns a checked copy or raises ConfigError."""
        return Config.from_dict(self.to_dict(), check_paths=check_paths)

    @property
    def mode(self) -> str:
        """`online` (teacher in the step), `cached` (no refresh) or `mixed` (cache + refresh)."""
        if self.train.online:
            return "online"
        if self.refresh.policy == "none" or self.refresh.fraction == 0:
            return "cached"
        return "mixed"

    @property
    def store_uri(self) -> str:
        return self.targets.store or f"{self.run.output_dir.rstrip('/')}/targets"


# ---------------------------------------------------------------------------------------------
# loading

def load_config(path: str | None = None, overrides: Sequence[str] = (),
                base: dict | None = None) -> Config:
    """`base` dict, then the YAML file at `path`, then `key.sub=value` overrides (YAML values)."""
    if base is not None and not isinstance(base, Mapping):
        raise ConfigError([f"config: base must be a mapping, got {_show(base)} — pass a dict of sections"])
    data = _merge({}, base or {})
    if path is not None:
        data = _merge(data, _read_yaml(path))
    if isinstance(overrides, str):  # a lone string would be iterated character by character
        overrides = [overrides]
    errors: list[str] = []
    for item in overrides:
        _apply_override(data, item, errors)
    return _parse(data, errors, check_paths=True)


def _read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, ValueError) as e:
        raise ConfigError([f"config: cannot read {path!r} ({e}) — check the --config path"]) from None
    try:
        loaded = _yaml_load(text)
    except Exception as e:  # YAMLError, or ValueError from e.g. an impossible date
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError([f"config: {path} is not valid YAML ({first}) — fix the syntax"]) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, Mapping):
        raise ConfigError([f"config: {path} holds {_show(loaded)}, not a mapping of sections — "
                           f"start the file with section names such as `teacher:`"])
    return loaded


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-4` (no dot) as a string; read it as the float everyone means."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _apply_override(data: dict, item: Any, errors: list[str]) -> None:
    fix = "write overrides as key.sub=value, e.g. train.lr=3e-4"
    if not isinstance(item, str) or "=" not in item:
        errors.append(f"{_show(item)}: malformed override — {fix}")
        return
    key, _, raw = item.partition("=")
    key, raw = key.strip(), raw.strip()
    parts = key.split(".")
    if not key or not all(p.strip() for p in parts):
        errors.append(f"{_show(item)}: malformed override key {key!r} — {fix}")
        return
    if not raw:
        errors.append(f"{key}: override has no value — give one, or {key}=null to unset it")
        return
    try:
        value = _yaml_load(raw)
    except Exception:
        errors.append(f"{key}: cannot parse override value {_show(raw)} as YAML — quote it or fix it")
        return
    if _field_type(parts) in (str, str | None) and not isinstance(value, (str, list, dict, type(None))):
        value = raw  # run.name=2024 means the string "2024"
    node = data
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        elif not isinstance(nxt, dict):
            errors.append(f"{key}: {'.'.join(parts[:i + 1])} is {_show(nxt)}, not a mapping — "
                          f"override {'.'.join(parts[:i + 1])} itself instead")
            return
        node = nxt
    node[parts[-1]] = value


def _field_type(parts: list[str]) -> Any:
    tp: Any = Config
    for p in parts:
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return None
        tp = _hints(tp).get(p)
    return tp


def _merge(a: dict, b: Mapping) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = _merge({}, v) if isinstance(v, Mapping) else copy.deepcopy(v)
    return out


# ---------------------------------------------------------------------------------------------
# checking

_BAD = object()
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}

def _ge(n):
    return (lambda v: v >= n), f"is below {n}"


def _gt0():
    return (lambda v: v > 0), "is not positive"


def _in(lo, hi, lo_open=False, hi_open=False):
    def test(v):
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    return test, f"is outside {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


_NONEMPTY = (len, "is empty")
# dotted key -> (test, what is wrong, how to fix); the test sees a well-typed value, None passes.
_RULES: dict[str, tuple[Any, str, str]] = {
    "run.name": (*_NONEMPTY, "give the run a name"),
    "run.output_dir": (*_NONEMPTY, "use a local directory or a URI such as s3://bucket/runs/x"),
    "run.resource_wait_s": (*_ge(0), "use a number of seconds, e.g. 1800 (0: do not wait for new nodes)"),
    "data.text_column": (*_NONEMPTY, "name the column that holds the text"),
    "data.messages_column": (*_NONEMPTY, "name the column that holds each row's list of {role, content}"),
    "data.prompt_column": (*_NONEMPTY, "name the column that holds the prompts"),
    "data.response_column": (*_NONEMPTY, "name the column that holds the responses"),
    "data.chat_template": (*_NONEMPTY, "give a Jinja template (text or a file path), or null for the tokenizer's"),
    "data.seq_len": (*_ge(2), "use at least 2 tokens (each target describes the next token)"),
    "data.eval_fraction": (*_in(0, 1, hi_open=True), "use e.g. 0.05 (0: no held-out eval)"),
    "data.max_rows": (*_ge(1), "use a positive row count, or null for every row"),
    "teacher.replicas": (*_ge(1), "use at least one teacher replica"),
    "teacher.cpus_per_replica": (*_gt0(), "give each replica some CPU, e.g. 1 (0.5 is fine)"),
    "teacher.gpus_per_replica": (*_ge(0), "use 0 for CPU replicas, or e.g. 1"),
    "teacher.batch_size": (*_ge(1), "use a batch size of at least 1"),
    "targets.k": (*_ge(1), "keep at least one top-k id, e.g. 32"),
    "targets.samples": (*_in(1, 255), "counts are stored as uint8: use 1 to 255 draws (default 50)"),
    "targets.capture_temperature": (*_gt0(), "use a temperature > 0, normally 1"),
    "targets.shard_rows": (*_ge(1), "use at least 1 sequence per shard, e.g. 256"),
    "targets.keep_versions": (*_ge(1), "keep at least the current version (2 lets running epochs finish)"),
    "train.workers": (*_ge(0), "use the number of DDP workers, or 0 to train in-process"),
    "train.cpus_per_worker": (*_gt0(), "give each worker some CPU, e.g. 1"),
    "train.epochs": (*_ge(1), "train for at least 1 epoch"),
    "train.max_steps": (*_ge(1), "use a positive step count, or null to run every epoch"),
    "train.batch_size": (*_ge(1), "use a batch size of at least 1"),
    "train.grad_accum": (*_ge(1), "use 1 for no accumulation"),
    "train.lr": (*_gt0(), "use a learning rate > 0, e.g. train.lr=3e-4"),
    "train.weight_decay": (*_ge(0), "use 0 for none, e.g. 0.01"),
    "train.warmup_steps": (*_ge(0), "use 0 for no warmup, or null to use train.warmup_ratio"),
    "train.warmup_ratio": (*_in(0, 1, hi_open=True), "use a share of the run's steps, e.g. 0.03 (0: no warmup)"),
    "train.grad_clip": (*_ge(0), "use a max grad norm such as 1.0 (0 turns clipping off)"),
    "train.jsd_beta": (*_in(0, 1, True, True), "use a weight strictly between 0 and 1, e.g. 0.5"),
    "train.alpha": (*_in(0, 1), "alpha weighs KD against cross-entropy: use 0 to 1"),
    "train.temperature": (*_gt0(), "use a temperature > 0, e.g. 1 or 2"),
    "train.temperature_schedule.start": (*_gt0(), "use a temperature > 0, or null for train.temperature"),
    "train.temperature_schedule.end": (*_gt0(), "use a temperature > 0, or null for train.temperature"),
    "train.checkpoint_every": (*_ge(1), "checkpoint every N >= 1 steps"),
    "train.max_failures": (*_ge(-1), "use -1 to retry forever, 0 never, N for N retries"),
    "train.log_every": (*_ge(1), "log every N >= 1 steps"),
    "train.loss_chunk_tokens": (*_ge(1), "use a positive token count, or null for about 2^23 logits per chunk"),
    "refresh.fraction": (*_in(0, 1), "use a fraction between 0 and 1"),
    "refresh.every_steps": (*_ge(1), "refresh every N >= 1 student steps"),
    "refresh.max_replicas": (*_ge(1), "allow at least one refresh teacher replica"),
    "refresh.max_age": (*_ge(1), "use a bound of at least 1 student step, or null for ceil(1/fraction) x every_steps"),
    "refresh.max_stall_share": (*_in(0, 1), "use a share of the training time between 0 and 1, e.g. 0.1"),
    "generate.max_new_tokens": (*_ge(1), "generate at least 1 token, e.g. generate.max_new_tokens=64"),
    "generate.temperature": (*_ge(0), "use 0 for greedy decoding, or a sampling temperature such as 0.7"),
    "generate.top_p": (*_in(0, 1, lo_open=True), "use a nucleus mass in (0, 1], 1 for none"),
    "generate.num_return_sequences": (*_ge(1), "generate at least one response per prompt"),
    "rationale.answer_prefix": (*_NONEMPTY, "give the text that opens the answer, e.g. rationale.answer_prefix='A:'"),
    "data.answer_column": (*_NONEMPTY, "name the column that holds each prompt's answer, or null"),
}
_CHOICES = {
    "task": tuple(TASKS),
    "data.format": DATA_FORMATS, "data.loss_on": LOSS_ON,
    "teacher.dtype": DTYPES, "student.dtype": DTYPES, "targets.format": TARGET_FORMATS,
    "train.loss": LOSSES, "train.temperature_schedule.kind": SCHEDULES, "train.strategy": STRATEGIES,
    "refresh.policy": REFRESH_POLICIES, "refresh.source": REFRESH_SOURCES, "refresh.enforce": REFRESH_ENFORCE,
    "generate.keep": GENERATE_KEEP,
}
_HUB_ID = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)?")


def _parse(d: Any, errors: list[str], check_paths: bool) -> Config:
    if not isinstance(d, Mapping):
        errors.append(f"config: expected a mapping of sections, got {_show(d)} — "
                      f"use sections such as teacher: {{model: gpt2}}")
        raise ConfigError(errors)
    cfg = _build(Config, d, "", errors)
    errors.extend(_teachers_section(cfg, d))
    if not isinstance(d.get("targets"), Mapping) or "format" not in d["targets"]:
        cfg.targets.format = TASK_FORMATS.get(cfg.task, TARGET_FORMATS)[0]  # unset: the task's default
    reported = {e.split(":", 1)[0] for e in errors}  # keys already wrong: no follow-on complaints
    errors.extend(p for p in _problems(cfg, check_paths, reported) if p.split(":", 1)[0] not in reported)
    if errors:
        raise ConfigError(errors)
    return cfg


def _build(cls: type, data: Any, prefix: str, errors: list[str]) -> Any:
    """Instance of dataclass `cls` from `data`; a bad entry is reported and left at its default."""
    if not isinstance(data, Mapping):
        errors.append(f"{prefix}: expected a mapping, got {_show(data)} — write `{prefix}:` "
                      f"followed by indented `key: value` lines")
        return cls()
    hints, defaults = _hints(cls), cls()
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in hints:
            errors.append(_unknown(key, name, list(hints), prefix))
            continue
        value = _check(value, hints[name], key, errors, getattr(defaults, name))
        if value is not _BAD:
            kwargs[name] = value
    return cls(**kwargs)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check(value: Any, tp: Any, key: str, errors: list[str], default: Any = None) -> Any:
    """`value` converted to type `tp`, or _BAD after reporting why it is not."""
    args = typing.get_args(tp)
    if type(None) in args:  # X | None
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, errors)
    origin = typing.get_origin(tp) or tp
    if origin is list and typing.get_args(tp) and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        if not isinstance(value, list):
            errors.append(f"{key}: expected a list, got {_show(value)} — write one `- name: ...` entry per item")
            return _BAD
        return [_build(typing.get_args(tp)[0], v, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        return _check_mapping(value, typing.get_args(tp), key, errors)
    ok = isinstance(value, origin) and not (origin in (int, float) and isinstance(value, bool))
    if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            value, ok = float(value), math.isfinite(float(value))
        except OverflowError:
            ok = False
    if not ok:
        example = default if isinstance(default, origin) else {int: 8, float: 0.5, str: "name"}[origin]
        example = yaml.safe_dump(example, default_flow_style=True).splitlines()[0]
        errors.append(f"{key}: expected {_TYPE_WORDS[origin]}, got {_show(value)} "
                      f"({type(value).__name__}) — e.g. {key}={example}")
        return _BAD
    return value


def _check_mapping(value: Any, args: tuple, key: str, errors: list[str]) -> Any:
    if not isinstance(value, Mapping):
        errors.append(f"{key}: expected a mapping, got {_show(value)} ({type(value).__name__}) — "
                      f"e.g. {key}: {{name: 1}}")
        return _BAD
    out, n = {}, len(errors)
    for k, v in value.items():
        if not isinstance(k, str):
            errors.append(f"{key}: key {_show(k)} is not a string — quote it")
            continue
        if args:  # dict[str, float]: Ray resource amounts
            v = _check(v, args[1], f"{key}.{k}", errors)
            if v is not _BAD and isinstance(v, float) and not v >= 0:
                errors.append(f"{key}.{k}: {_show(v)} is negative — resource amounts must be >= 0")
        out[k] = copy.deepcopy(v)
    return out if len(errors) == n else _BAD


def _problems(cfg: Config, check_paths: bool, reported: set[str] = frozenset()) -> list[str]:
    """Value and cross-field problems of a well-typed Config (`reported`: keys with type errors)."""
    out = []
    for key, (test, what, fix) in _RULES.items():
        v = _get(cfg, key)
        if v is not None and not test(v):
            out.append(f"{key}: {_show(v)} {what} — {fix}")
    for key, choices in _CHOICES.items():
        v = _get(cfg, key)
        if v not in choices:
            near = difflib.get_close_matches(v, choices, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            out.append(f"{key}: {_show(v)} is not one of {', '.join(choices)} — {hint}"
                       f"e.g. {key}={choices[0]}")
    t, s, tr, r = cfg.teacher, cfg.student, cfg.train, cfg.refresh
    if t.model is None and not cfg.teachers:
        out.append("teacher.model: missing — set it to a local model directory or a Hugging Face hub id")
    models = [("teacher.model", t.model), ("student.model", s.model)]
    out += [p for key, m in models if m is not None and check_paths and (p := _model_problem(key, m))]
    student_ok = not reported & {"student.model", "student.init_from_teacher"}
    if (s.model is None) == (s.init_from_teacher is None) and student_ok:
        state = "both {} and {} are set" if s.model is not None else "neither {} nor {} is set"
        out.append(f"student: {state.format('student.model', 'student.init_from_teacher')} — set exactly "
                   f"one: a model directory / hub id, or e.g. student.init_from_teacher: {{n_layer: 2}}")
    copy_layers = (s.init_from_teacher or {}).get("copy_layers", False)
    if not isinstance(copy_layers, bool):
        out.append(f"student.init_from_teacher.copy_layers: expected true or false, got {_show(copy_layers)} "
                   f"— e.g. student.init_from_teacher.copy_layers=true")
    formats = TASK_FORMATS.get(cfg.task, TARGET_FORMATS)
    if cfg.targets.format in TARGET_FORMATS and cfg.targets.format not in formats:
        out.append(f"targets.format: {_show(cfg.targets.format)} is not one of {', '.join(formats)}, the formats "
                   f"of task {cfg.task} (dense keeps every class of a classifier) — use "
                   f"{' or '.join(f'targets.format={f}' for f in formats)}, or leave it unset")
    if tr.loss in ("reverse_kl", "jsd", "tvd") and cfg.targets.format == "sampled" and not tr.online:
        out.append(f"train.loss: {tr.loss} needs targets.format=topk (sampled targets have no tail bucket "
                   f"for the mass outside the draws) — set targets.format=topk, "
                   f"train.loss=forward_kl, or train.online=true")
    out += _temperature_problems(cfg)
    if cfg.data.format in DATA_FORMATS and cfg.data.format != "text" and cfg.task != "causal_lm":
        out.append(f"data.format: {cfg.data.format} examples (a loss mask over response tokens) are for task "
                   f"causal_lm, not {cfg.task} — use data.format=text, or task: causal_lm")
    out += _teachers_problems(cfg, check_paths)
    out += _generate_problems(cfg)
    if tr.strategy == "fsdp" and r.source == "on_policy" and r.policy != "none":
        out.append("train.strategy: fsdp cannot yet write the on-policy student (rank 0 saves it alone, the "
                   "weights are sharded) — use train.strategy=ddp with refresh.source=on_policy, or "
                   "refresh.source=teacher / resample")
    if 0 <= r.fraction <= 1 and r.policy in REFRESH_POLICIES:
        if r.policy != "none" and r.fraction == 0:
            out.append(f"refresh.fraction: 0 with refresh.policy={r.policy} refreshes nothing — set "
                       f"refresh.fraction in (0, 1], or refresh.policy=none")
        if r.policy == "none" and r.fraction > 0:
            out.append(f"refresh.policy: none while refresh.fraction={r.fraction} — set "
                       f"refresh.policy=round_robin (bounded age) or random, or refresh.fraction=0")
    return out


def _temperature_problems(cfg: Config) -> list[str]:
    """Training temperatures the stored targets cannot serve: sampled counts only at their capture
    temperature; topk only where its stored tail grid reaches (see targets.TAIL_BETAS)."""
    tr, tc, fmt = cfg.train, cfg.targets.capture_temperature, cfg.targets.format
    sch = tr.temperature_schedule
    if tr.online or tr.alpha == 0 or fmt not in ("sampled", "topk") or not tc > 0 or not tr.temperature > 0:
        return []
    start = tr.temperature if sch.start is None else sch.start
    end = tr.temperature if sch.end is None else sch.end
    temps = [start] if sch.kind == "constant" else [start, end]
    if not all(isinstance(x, float) and x > 0 for x in temps):
        return []  # reported by the per-key rules
    key = "train.temperature" if sch.kind == "constant" and sch.start is None else "train.temperature_schedule"
    if fmt == "sampled" and any(not math.isclose(x, tc, rel_tol=1e-6) for x in temps):
        return [f"{key}: {', '.join(f'{x:g}' for x in temps)} differs from targets.capture_temperature {tc:g} — "
                "sampled counts estimate the teacher at the capture temperature only (re-tempering them "
                f"is biased): set {key} to {tc:g}, set targets.capture_temperature to the training "
                "temperature (drawn from the tempered teacher), or use targets.format=topk for a schedule"]
    lo, hi = (tc * r for r in TOPK_TEMPERATURE_RANGE)
    if fmt == "topk" and any(not lo * (1 - 1e-6) <= x <= hi * (1 + 1e-6) for x in temps):
        return [f"{key}: {', '.join(f'{x:g}' for x in temps)} is outside {lo:g} to {hi:g}, the temperatures "
                f"topk targets captured at targets.capture_temperature {tc:g} can be re-tempered to — keep "
                "the temperatures in that range or capture at another targets.capture_temperature"]
    return []


def _generate_problems(cfg: Config) -> list[str]:
    """Generation passes and answer accuracy need prompts: examples, not packed text."""
    g, out = cfg.generate, []
    fmt = getattr(cfg.data, "format", "text")  # data.format: instruction data (raydistill.instruct)
    if g.enabled and cfg.task != "causal_lm":
        out.append(f"generate.enabled: task {cfg.task} has no responses to generate — generation passes "
                   "need task: causal_lm, or set generate.enabled=false")
    if g.enabled and cfg.teachers:
        out.append("generate.enabled: generation passes use one teacher — set teacher: instead of teachers:, "
                   "or generate.enabled=false")
    if g.enabled and fmt == "text":
        out.append("generate.enabled: data.format is text (packed windows have no prompts) — set "
                   "data.format=prompt_response or chat, or generate.enabled=false")
    if g.enabled and getattr(cfg.data, "loss_on", "response") == "all":
        out.append("generate.enabled: data.loss_on=all leaves no prompt/response boundary in the rows, so the "
                   "generation pass can't find the prompts — set data.loss_on=response, or generate.enabled=false")
    if g.prompt_template is not None and fmt == "chat":
        out.append("generate.prompt_template: a chat prompt ends with the assistant header, after which a "
                   "template's text would land — put the instruction in the user messages, or use "
                   "data.format=prompt_response")
    if g.num_return_sequences > 1 and g.temperature == 0:
        out.append(f"generate.num_return_sequences: {g.num_return_sequences} greedy responses per prompt are "
                   "identical copies — set generate.temperature > 0 (e.g. 0.7), or "
                   "generate.num_return_sequences=1")
    if g.prompt_template is not None:
        try:
            g.prompt_template.format(prompt="")
            ok = "{prompt}" in g.prompt_template
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            out.append(f"generate.prompt_template: {_show(g.prompt_template)} must contain {{prompt}} and no other "
                       "{field} (write {{ for a literal brace) — e.g. "
                       "generate.prompt_template='{prompt}\\nLet\'s think step by step.'")
    if cfg.data.answer_column is not None and fmt != "prompt_response":
        out.append(f"data.answer_column: answers are matched to prompts of data.format=prompt_response, not "
                   f"{fmt} — set data.format=prompt_response (with data.prompt_column), or data.answer_column=null")
    return out


def _teachers_section(cfg: Config, d: Mapping) -> list[str]:
    """`teachers:` replaces `teacher:`; `teacher` then mirrors teachers[0] (tokenizer, student init, eval)."""
    if not cfg.teachers:
        if isinstance(d.get("teachers"), list):  # (not a list: reported already)
            return ["teachers: empty list — list the teachers (- name: ..., model: ...), or use teacher:"]
        return []
    if "teacher" in d:
        return ["teacher: set together with teachers: — use one: teacher: for one teacher, teachers: for "
                "several (each entry takes every teacher.* key plus name and weight)"]
    first = cfg.teachers[0]
    cfg.teacher = TeacherConfig(**{f.name: copy.deepcopy(getattr(first, f.name))
                                   for f in dataclasses.fields(TeacherConfig)})
    return []


def _teachers_problems(cfg: Config, check_paths: bool) -> list[str]:
    """Each teacher entry's keys (the teacher.* rules), unique names, and routing against the names."""
    out, seen = [], set()
    if cfg.compare_single_teacher is not None and cfg.compare_single_teacher not in [e.name for e in cfg.teachers]:
        out.append(f"compare_single_teacher: {cfg.compare_single_teacher!r} is not a teacher — use one of "
                   f"{', '.join(str(e.name) for e in cfg.teachers) or '(no teachers: set teachers:)'}, or null")
    if cfg.routing is not None and not cfg.teachers:
        return out + ["routing: set without teachers: — routing picks one of several teachers per row; list them "
                "under teachers:, or remove routing"]
    for i, entry in enumerate(cfg.teachers):
        key = f"teachers[{i}]"
        for rule, (test, what, fix) in _RULES.items():
            v = getattr(entry, rule.split(".", 1)[1]) if rule.startswith("teacher.") else None
            if v is not None and not test(v):
                out.append(f"{key}.{rule[8:]}: {_show(v)} {what} — {fix}")
        if entry.dtype not in DTYPES:
            out.append(f"{key}.dtype: {_show(entry.dtype)} is not one of {', '.join(DTYPES)} — e.g. {key}.dtype=float32")
        if not entry.name or not TEACHER_NAME.match(entry.name) or entry.name == MIXTURE:
            out.append(f"{key}.name: {_show(entry.name)} is not a usable name — give each teacher a name of "
                       f"letters, digits, '_' or '-' (not {MIXTURE!r}), e.g. name: code")
        elif entry.name in seen:
            out.append(f"{key}.name: {entry.name!r} is used by an earlier teacher — teacher names must be unique")
        seen.add(entry.name)
        if not entry.weight > 0:
            out.append(f"{key}.weight: {_show(entry.weight)} is not positive — use a mixture weight > 0 (default 1)")
        if entry.model is None:
            out.append(f"{key}.model: missing — set it to a local model directory or a Hugging Face hub id")
        elif check_paths and (p := _model_problem(f"{key}.model", entry.model)):
            out.append(p)
    if not cfg.teachers:
        return out
    ro, names = cfg.routing, [e.name for e in cfg.teachers]
    if ro is not None:
        if not ro.column:
            out.append("routing.column: missing — name the corpus column whose value picks each row's teacher")
        for value, name in ro.teachers.items():
            if name not in names:
                out.append(f"routing.teachers.{value}: {name!r} is not a teacher — use one of {', '.join(names)}")
        if ro.default is not None and ro.default not in names + [MIXTURE]:
            out.append(f"routing.default: {ro.default!r} is not a teacher — use one of {', '.join(names)}, "
                       f"{MIXTURE}, or null to refuse unmapped values")
    mixed = ro is None or ro.default == MIXTURE
    if mixed and cfg.targets.format != "sampled":
        out.append(f"targets.format: {cfg.targets.format} cannot hold a mixture of teachers (rows that no routing "
                   f"value maps to one teacher) — a mixture is stored as stratified draws: set "
                   f"targets.format=sampled, or route every row to one teacher (routing.default: <name>)")
    if cfg.train.online:
        out.append("train.online: runs one teacher inside the step — with teachers: use cached targets "
                   "(train.online=false)")
    if cfg.refresh.source == "on_policy" and cfg.refresh.policy != "none":
        out.append("refresh.source: on_policy is not supported with teachers: yet — use refresh.source=teacher "
                   "or resample")
    return out


def warmup_steps_for(train_cfg: TrainConfig, total_steps: int) -> int:
    """LR warmup steps of a run of `total_steps`: train.warmup_steps if set (it wins, as in Hugging
    Face), else ceil(train.warmup_ratio x total_steps)."""
    if train_cfg.warmup_steps is not None:
        return int(train_cfg.warmup_steps)
    return int(math.ceil(train_cfg.warmup_ratio * max(0, total_steps)))


def _model_problem(key: str, value: str) -> str | None:
    try:
        path = os.path.expanduser(value)
    except ValueError:  # e.g. an embedded NUL byte in ~user
        path = value
    if value and os.path.isdir(path):
        return None
    if value.startswith(("/", ".", "~")) or (value and os.path.exists(path)):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        return (f"{key}: local path {value!r} {what} — point it at a directory with config.json and "
                f"weights, or use a Hugging Face hub id such as 'gpt2'")
    if _HUB_ID.fullmatch(value):
        return None  # a hub id: downloaded when the model is loaded
    return (f"{key}: {_show(value)} is neither an existing directory nor a hub id — use a local model "
            f"directory or a hub id such as 'org/name'")


def _unknown(key: str, name: Any, known: list[str], prefix: str) -> str:
    near = difflib.get_close_matches(str(name), known, n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    where = f"of {prefix}" if prefix else "(sections)"
    return f"{key}: unknown key — {hint}known keys {where}: {', '.join(known)}"


def _get(obj: Any, dotted: str) -> Any:
    for p in dotted.split("."):
        obj = getattr(obj, p)
    return obj


def _show(v: Any) -> str:
    text = "null" if v is None else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
