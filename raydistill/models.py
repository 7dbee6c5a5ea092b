"""Loading Hugging Face models and tokenizers safely, and checking a teacher/student pair.

Security defaults: weights load from safetensors only (a directory holding only pickle weights
is refused unless `allow_pickle_weights`, and then with `weights_only=True`), and
`trust_remote_code` stays off unless the config sets it.

Everything here runs on the driver before any Ray work (`preflight`) or inside one worker.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass

import torch

from .errors import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def is_local(name_or_path: str) -> bool:
    return os.path.isdir(os.path.expanduser(name_or_path))


def _weight_files(path: str) -> tuple[list[str], list[str]]:
    safe = glob.glob(os.path.join(path, "*.safetensors"))
    pickled = [f for p in _PICKLE_PATTERNS for f in glob.glob(os.path.join(path, p))
               if not f.endswith("training_args.bin")]
    return safe, pickled


def check_weights(name_or_path: str, *, allow_pickle_weights: bool, key: str) -> None:
    """Refuse a local model directory whose weights exist only as pickle files."""
    if not is_local(name_or_path):
        return
    path = os.path.expanduser(name_or_path)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ModelError(f"{key}: {path} has no config.json — point {key} at a directory written by "
                         "save_pretrained (or a Hugging Face hub id)")
    safe, pickled = _weight_files(path)
    if not safe and pickled and not allow_pickle_weights:
        # Only the teacher has an allow_pickle_weights key; the student must be converted.
        allow = (f", or set {key.rsplit('.', 1)[0]}.allow_pickle_weights=true if you trust the file "
                 "(loaded with weights_only=True)") if key.startswith("teacher.") else ""
        raise ModelError(
            f"{key}: {path} holds only pickle weights ({os.path.basename(pickled[0])}), which can run "
            f"arbitrary code when loaded — convert them to safetensors (model.save_pretrained(dir, "
            f"safe_serialization=True)){allow}")
    if not safe and not pickled:
        raise ModelError(f"{key}: {path} has a config.json but no weight files (*.safetensors) — "
                         "is the download or save incomplete?")


def load_config(name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None,
                key: str = "teacher.model"):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(os.path.expanduser(name_or_path), revision=revision,
                                          trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            # Only the teacher has a trust_remote_code key (init_from_teacher students follow it).
            fix = (f"read that code, then set {key.rsplit('.', 1)[0]}.trust_remote_code=true to allow it"
                   if key.startswith("teacher.") else
                   "a student.model with custom code is not supported — use a model transformers "
                   "implements, or student.init_from_teacher")
            raise ModelError(
                f"{key}: {name_or_path} needs custom code from its repository (trust_remote_code) — {fix}"
            ) from None
        raise ModelError(f"{key}: cannot read the model config of {name_or_path}: {e}") from None
    except OSError as e:
        raise ModelError(f"{key}: cannot load {name_or_path} ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0]}) — check the path or hub id, and network access "
                         "for hub ids") from None


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None,
                   key: str = "teacher.model"):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(name_or_path), revision=revision,
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"{key}: cannot load the tokenizer of {name_or_path}: "
                         f"{str(e).splitlines()[0]} — save the tokenizer beside the model "
                         "(tokenizer.save_pretrained(dir))") from None
    return tok


def load_causal_lm(name_or_path: str, *, dtype: str = "float32", trust_remote_code: bool = False,
                   allow_pickle_weights: bool = False, revision: str | None = None,
                   device_map=None, key: str = "teacher.model", auto_class: str = "AutoModelForCausalLM"):
    """Any model the transformers Auto class `auto_class` loads (a causal LM by default; a task
    names its own, e.g. AutoModelForSequenceClassification), safely, in eval mode."""
    import transformers

    check_weights(name_or_path, allow_pickle_weights=allow_pickle_weights, key=key)
    kwargs = dict(dtype=DTYPES[dtype], revision=revision, trust_remote_code=trust_remote_code)
    if allow_pickle_weights:
        kwargs["weights_only"] = True  # torch.load refuses arbitrary objects even when pickle is allowed
    else:
        kwargs["use_safetensors"] = True
    if device_map is not None:
        kwargs["device_map"] = device_map  # accelerate spreads a big teacher over several GPUs
    try:
        model = getattr(transformers, auto_class).from_pretrained(os.path.expanduser(name_or_path), **kwargs)
    except (OSError, ValueError) as e:
        what = "a causal LM" if auto_class == "AutoModelForCausalLM" else auto_class
        raise ModelError(f"{key}: cannot load {name_or_path} as {what}: "
                         f"{str(e).splitlines()[0]}") from None
    return model.eval()


def vocabulary_of(name_or_path: str, *, key: str, trust_remote_code: bool = False, revision: str | None = None):
    """(config, tokenizer fingerprint) of a model that must share the teacher's vocabulary."""
    conf = load_config(name_or_path, trust_remote_code=trust_remote_code, revision=revision, key=key)
    tok = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code, revision=revision, key=key)
    return conf, tokenizer_fingerprint(tok, name_or_path)


def tokenizer_fingerprint(tokenizer, name: str) -> dict:
    """Vocabulary size and a hash of the token→id map: two models share logits only if these match."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()
    return {"name": name, "vocab_size": len(vocab), "hash": f"sha256:{digest[:32]}"}


def model_revision(name_or_path: str, revision: str | None = None) -> str:
    """A teacher revision id: changes when the weights at the path change (a new checkpoint)."""
    if not is_local(name_or_path):
        return f"hub:{name_or_path}@{revision or 'main'}"
    path = os.path.expanduser(name_or_path)
    h = hashlib.sha256()
    with open(os.path.join(path, "config.json"), "rb") as f:
        h.update(f.read())
    safe, pickled = _weight_files(path)
    for f in sorted(safe + pickled):
        st = os.stat(f)  # size + mtime: hashing 100+ GB of weights per run would cost minutes
        h.update(f"{os.path.basename(f)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"local:{h.hexdigest()[:16]}"


def max_positions(config) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


_ALIASES = {"n_layer": "num_hidden_layers", "num_hidden_layers": "n_layer", "n_embd": "hidden_size",
            "hidden_size": "n_embd", "n_head": "num_attention_heads", "num_attention_heads": "n_head"}


def student_config(teacher_config, overrides: dict):
    """The teacher's config with fewer layers / a smaller width (student.init_from_teacher)."""
    cfg = teacher_config.__class__.from_dict(teacher_config.to_dict())
    for k, v in overrides.items():
        if k == "copy_layers":
            continue
        if not hasattr(cfg, k) and hasattr(cfg, _ALIASES.get(k, k)):
            k = _ALIASES[k]  # GPT-2 and Llama names for the same field both work
        if not hasattr(cfg, k):
            raise ModelError(f"student.init_from_teacher.{k}: {type(cfg).__name__} has no such field — "
                             "use a field of the teacher's config.json (e.g. n_layer, num_hidden_layers)")
        setattr(cfg, k, v)
    return cfg


def build_student(student_cfg, teacher_path: str, *, trust_remote_code: bool = False, seed: int = 0,
                  auto_class: str = "AutoModelForCausalLM"):
    """The student model: a pretrained path, or a smaller copy of the teacher's architecture."""
    import transformers

    if student_cfg.model:
        return load_causal_lm(student_cfg.model, dtype="float32", key="student.model", auto_class=auto_class)
    teacher_config = load_config(teacher_path, trust_remote_code=trust_remote_code)
    overrides = dict(student_cfg.init_from_teacher or {})
    torch.manual_seed(seed)
    model = getattr(transformers, auto_class).from_config(student_config(teacher_config, overrides),
                                                          trust_remote_code=trust_remote_code)
    if overrides.get("copy_layers"):
        teacher = load_causal_lm(teacher_path, trust_remote_code=trust_remote_code, auto_class=auto_class)
        copy_teacher_layers(teacher, model)
    return model


def copy_teacher_layers(teacher, student) -> int:
    """Initialise the student from evenly spaced teacher layers (every other one for half depth).

    Copies every parameter whose name and shape match after mapping student layer i to teacher
    layer round(i * n_teacher / n_student); returns how many tensors were copied."""
    t_state = teacher.state_dict()
    n_t = _n_layers(teacher.config)
    n_s = _n_layers(student.config)
    layer = re.compile(r"\.(\d+)\.")
    copied = 0
    with torch.no_grad():
        for name, param in student.state_dict().items():
            src = name
            m = layer.search(name)
            if m and n_t and n_s:
                src = name[:m.start()] + f".{round(int(m.group(1)) * n_t / n_s)}." + name[m.end():]
            if src in t_state and t_state[src].shape == param.shape:
                param.copy_(t_state[src])
                copied += 1
    return copied


def _n_layers(config) -> int | None:
    for attr in ("num_hidden_layers", "n_layer"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    return None


@dataclass
class ModelInfo:
    """What preflight learned; travels to Ray workers (plain data).

    vocab_size is W, the one width every model's logits are compared at: the narrowest output
    layer (config.vocab_size) of the teacher(s) and the student. Heads are often wider than their
    tokenizer (Qwen2.5-7B 152,064 and -0.5B 151,936 rows for one 151,665-token tokenizer: rows
    padded to a round size that no token id reaches); W >= len(tokenizer) always (`head_problem`),
    so ids >= W are padding. The teacher pass keeps only logits[..., :W] (its ids and dense rows are
    < W, the store's id type is that of W), and the losses and evaluation give the teacher
    probability 0 beyond W while the student's softmax stays over its whole head.
    tokenizer: the fingerprint (`tokenizer_fingerprint`) plus "width": W, as the store's manifest
    records it.
    """
    tokenizer: dict
    vocab_size: int
    teacher_rev: str
    max_positions: int | None
    eos_token_id: int | None

    def narrow(self, width: int) -> None:
        """Share the width with one more model (another teacher): W = min(W, its head width)."""
        self.vocab_size = min(self.vocab_size, int(width))
        self.tokenizer["width"] = self.vocab_size


def same_tokenizer(a: dict, b: dict) -> bool:
    """Two fingerprints of one tokenizer: the same token->id map (hash) and size."""
    return a["hash"] == b["hash"] and a["vocab_size"] == b["vocab_size"]


def head_problem(key: str, name: str, config, fp: dict, fix: str | None = None) -> str | None:
    """Why a model's output layer can't score its tokenizer's ids (fewer rows than tokens); None if it can."""
    width = int(config.vocab_size)
    if width >= fp["vocab_size"]:
        return None
    return (f"{key}: {name} has an output layer of {width} rows (config.vocab_size) but its tokenizer has "
            f"{fp['vocab_size']} tokens — ids >= {width} would have no logit: "
            + (fix or "the model and the tokenizer saved beside it do not belong together; save the "
                      "model's own tokenizer with it"))


def preflight(cfg) -> ModelInfo:
    """Check teacher, student and the targets against each other before any cluster work."""
    t = cfg.teacher
    check_weights(t.model, allow_pickle_weights=t.allow_pickle_weights, key="teacher.model")
    t_conf = load_config(t.model, trust_remote_code=t.trust_remote_code, revision=t.revision)
    tok = load_tokenizer(t.model, trust_remote_code=t.trust_remote_code, revision=t.revision)
    fp = tokenizer_fingerprint(tok, t.model)
    problems = [p for p in [head_problem("teacher.model", t.model, t_conf, fp)] if p]
    vocab_size = int(t_conf.vocab_size)  # W: narrowed by the student's head below (ModelInfo)
    n_pos = max_positions(t_conf)
    if n_pos is not None and cfg.data.seq_len > n_pos:
        problems.append(f"data.seq_len: {cfg.data.seq_len} exceeds the teacher's maximum of {n_pos} "
                        f"positions ({t.model}) — use data.seq_len<={n_pos}")
    s = cfg.student
    s_conf, s_key = None, "student.model"
    if s.model:
        check_weights(s.model, allow_pickle_weights=False, key="student.model")
        s_conf, s_fp = vocabulary_of(s.model, key="student.model")
        if not same_tokenizer(s_fp, fp):
            problems.append(
                f"student.model: its vocabulary differs from the teacher's — teacher {t.model} has "
                f"{fp['vocab_size']} tokens ({fp['hash']}), student {s.model} has {s_fp['vocab_size']} "
                f"tokens ({s_fp['hash']}); logit distillation needs one tokenizer — pick a student of "
                "the teacher's family or use student.init_from_teacher")
            s_conf = None
        s_pos = max_positions(s_conf) if s_conf is not None else None
        if s_pos is not None and cfg.data.seq_len > s_pos:
            problems.append(f"data.seq_len: {cfg.data.seq_len} exceeds the student's maximum of {s_pos} "
                            f"positions ({s.model}) — use data.seq_len<={s_pos}")
    else:  # raises on unknown fields; an init_from_teacher.vocab_size override is a head width too
        s_conf, s_key = student_config(t_conf, dict(s.init_from_teacher or {})), "student.init_from_teacher"
    if s_conf is not None:
        fix = None if s.model else f"set {s_key}.vocab_size >= {fp['vocab_size']} or leave it out"
        bad = head_problem(s_key, s.model or "the student", s_conf, fp, fix)
        problems += [bad] if bad else []
        vocab_size = min(vocab_size, int(s_conf.vocab_size))
        if cfg.train.online and cfg.train.loss == "reverse_kl" and int(s_conf.vocab_size) > vocab_size:
            problems.append(
                f"train.loss: reverse_kl with train.online=true is infinite here — the student has "
                f"{s_conf.vocab_size} output rows, the teacher {t.model} {vocab_size}, and the teacher "
                "gives the student's extra (padding) rows probability 0 — use train.loss=forward_kl, "
                "jsd or tvd, or cached targets.format=topk (its tail bucket holds those rows)")
    if cfg.targets.format == "topk" and cfg.targets.k > vocab_size:
        problems.append(f"targets.k: {cfg.targets.k} is larger than the vocabulary ({vocab_size}) of "
                        f"{t.model} — use targets.k<={vocab_size}")
    if problems:
        raise ModelError("\n".join(problems))
    return ModelInfo(tokenizer=dict(fp, width=vocab_size), vocab_size=vocab_size,
                     teacher_rev=model_revision(t.model, t.revision), max_positions=n_pos,
                     eos_token_id=tok.eos_token_id)
