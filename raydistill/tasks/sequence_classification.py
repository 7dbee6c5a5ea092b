"""`sequence_classification`: one soft target per example, from a classifier teacher.

Input rows (one per example, no packing):

    seq_id     int64
    input_ids  list<uint16|uint32>  `data.seq_len` tokens: [CLS] text [SEP] (pair [SEP]), truncated,
                                    then padded with the tokenizer's pad id
    labels     list<int64>          length P = 1: the class id through the teacher's label2id,
                                    -100 where the row has no label (unlabelled transfer data)

The attention mask is `input_ids != pad_id` and BERT's segment ids count the [SEP]s before a token,
so neither is stored: both are exact for tokenizers that never emit [PAD] inside a text. Targets
are `dense` (targets.py): float16 log-probs over the C classes at the capture temperature, plus
`labels`, so the trainer reads one shard for both. logits [B, 1, C], labels [B, 1]: the existing
losses see one position per example.

Every check of the data against the teacher (label values, label names, num_labels, a classifier
head at all) runs in `preflight`, before Ray starts; the workers only apply the mapping.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pyarrow as pa

from . import TASK_FORMATS
from .base import Task, int_matrix

AUTO_CLASS = "AutoModelForSequenceClassification"
IGNORE = -100
ECE_BINS = 15
_DEFAULT_NAME = re.compile(r"LABEL_\d+")  # transformers' placeholder names: a config with no label names


class SequenceClassification(Task):
    name = "sequence_classification"
    formats = TASK_FORMATS[name]
    default_format = formats[0]

    def __init__(self, cfg):
        super().__init__(cfg)
        self._special: tuple[int, int | None] | None = None

    # ---- models
    def load_model(self, name_or_path: str, **kwargs):
        from ..models import load_causal_lm

        return load_causal_lm(name_or_path, auto_class=AUTO_CLASS, **kwargs)

    def build_student(self, *, seed: int):
        from ..models import build_student

        return build_student(self.cfg.student, self.cfg.teacher.model, seed=seed, auto_class=AUTO_CLASS,
                             trust_remote_code=self.cfg.teacher.trust_remote_code)

    # ---- data
    def input_schema(self, vocab_size: int) -> pa.Schema:
        from ..targets import id_type

        return pa.schema([("seq_id", pa.int64()), ("input_ids", pa.list_(id_type(vocab_size))),
                          ("labels", pa.list_(pa.int64()))])

    def map_batches_fn(self, tokenizer_path: str, eos_id: int) -> tuple:
        """(function, its kwargs, the corpus columns it reads, text first): corpus rows -> input rows."""
        from ..models import load_config

        d, t = self.cfg.data, self.cfg.teacher
        t_conf = load_config(t.model, trust_remote_code=t.trust_remote_code, revision=t.revision)
        kwargs = dict(tokenizer_path=os.path.expanduser(tokenizer_path), trust_remote_code=t.trust_remote_code,
                      text_column=d.text_column, text_pair_column=d.text_pair_column,
                      label_column=d.label_column, seq_len=d.seq_len, num_labels=int(t_conf.num_labels),
                      label2id={str(k): int(v) for k, v in (t_conf.label2id or {}).items()})
        return tokenize_examples, kwargs, [c for c in (d.text_column, d.text_pair_column, d.label_column) if c]

    def inputs_from_arrow(self, batch) -> dict:
        import torch

        ids = int_matrix(batch.column("input_ids"))
        pad, sep = self._special_ids()
        seps = ids == sep if sep is not None else np.zeros_like(ids, dtype=bool)
        inputs = {"input_ids": ids, "attention_mask": (ids != pad).astype(np.int64),
                  # segment 1 starts after the first [SEP]: [CLS] a [SEP] -> 0, b [SEP] -> 1
                  "token_type_ids": ((np.cumsum(seps, axis=1) - seps) >= 1).astype(np.int64) * (ids != pad),
                  "labels": int_matrix(batch.column("labels"))}
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}

    def _special_ids(self) -> tuple[int, int | None]:
        """(pad id, sep id) of the teacher's tokenizer, loaded once per process."""
        if self._special is None:
            tok = _load_tokenizer(self.cfg.teacher.model, self.cfg.teacher.trust_remote_code)
            self._special = (tok.pad_token_id, tok.sep_token_id)
        return self._special

    # ---- positions
    def logits(self, model, inputs: dict):
        config = getattr(model, "module", model).config  # DDP wraps the HF model
        kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        if (getattr(config, "type_vocab_size", 1) or 1) > 1:  # BERT-style pairs; RoBERTa / DistilBERT have none
            kwargs["token_type_ids"] = inputs["token_type_ids"]
        return model(**kwargs).logits.unsqueeze(1)

    def labels(self, inputs: dict):
        return inputs["labels"]

    def encode_targets(self, model, inputs, *, params: dict, vocab_size: int, generator) -> dict:
        from ..targets import encode_dense

        return encode_dense(self.logits(model, inputs), self.labels(inputs),
                            capture_temperature=params["capture_temperature"])

    # ---- evaluation
    def evaluate(self, student, teacher, eval_table: pa.Table, *, batch_size: int, max_rows: int,
                 vocab_width: int | None = None) -> dict:
        import torch

        del vocab_width  # a width of token ids: a classifier's logits are its classes
        rows = eval_table.slice(0, max_rows) if max_rows else eval_table
        if rows.num_rows == 0:
            raise ValueError("evaluate: the eval table has no rows")
        models = {"student": student, "teacher": teacher}
        lp: dict[str, list] = {k: [] for k, m in models.items() if m is not None}
        labels = []
        with torch.inference_mode():
            for lo in range(0, rows.num_rows, batch_size):
                inputs = self.inputs_from_arrow(rows.slice(lo, batch_size))
                labels.append(inputs["labels"][:, 0])
                for k in lp:
                    m = models[k].eval()
                    lp[k].append(torch.log_softmax(self.logits(m, inputs)[:, 0].float(), dim=-1))
        y = torch.cat(labels)
        logp = {k: torch.cat(v) for k, v in lp.items()}
        out: dict = {k: classification_metrics(v, y, teacher_logp=logp.get("teacher") if k == "student" else None)
                     for k, v in logp.items()}
        named = (teacher or student).config.id2label
        out.update(eval_sequences=rows.num_rows, labelled=int((y != IGNORE).sum()),
                   label_names=[named[i] for i in sorted(named)])
        return out

    # ---- checks before Ray starts
    def preflight(self) -> list[str]:
        """Problems of this config with its data and models, as `key: what — fix` lines (reads the
        models' config.json files and the corpus's label column; no cluster)."""
        from ..models import load_config

        cfg, problems = self.cfg, []
        d, t = cfg.data, cfg.teacher
        t_conf = load_config(t.model, trust_remote_code=t.trust_remote_code, revision=t.revision)
        s_conf = load_config(cfg.student.model, key="student.model") if cfg.student.model else None
        archs = list(getattr(t_conf, "architectures", None) or [])
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            problems.append(f"teacher.model: {cfg.teacher.model} is not a sequence classifier (architectures: "
                            f"{', '.join(archs) or 'none'}); its classification head would be random — "
                            "fine-tune it on labelled data first, or point teacher.model at a "
                            "*ForSequenceClassification checkpoint")
        n = int(t_conf.num_labels)
        overrides = dict(cfg.student.init_from_teacher or {})
        s_labels = int(s_conf.num_labels) if s_conf is not None else int(overrides.get("num_labels", n))
        if s_labels != n:
            where = cfg.student.model or "student.init_from_teacher.num_labels"
            problems.append(f"student.model: {where} has {s_labels} labels, the teacher {cfg.teacher.model} "
                            f"{n} ({', '.join(map(str, label_names(t_conf)))}) — a student must predict "
                            "the teacher's classes: use a student with the same num_labels, or "
                            "student.init_from_teacher")
        if cfg.refresh.policy != "none" and cfg.refresh.source == "on_policy":
            problems.append("refresh.source: on_policy re-scores inputs the student generates; a classifier "
                            "generates no text — use refresh.source=teacher (a new teacher revision) or "
                            "refresh.policy=none (a fixed teacher's dense targets never go stale)")
        if cfg.train.fused_loss:
            problems.append("train.fused_loss: the fused LM head + loss bounds the memory of a language "
                            "model's vocabulary-sized logits; a classifier's are [batch, 1, classes] — "
                            "leave train.fused_loss unset (or false) for task sequence_classification")
        if d.label_column is None:
            if cfg.train.alpha != 1:
                problems.append(f"train.alpha: {cfg.train.alpha} weighs in a cross-entropy on labels, but "
                                "data.label_column is not set (unlabelled transfer data: the teacher is the "
                                "only signal) — set train.alpha=1, or set data.label_column")
            if cfg.run.compare_hard_labels:
                problems.append("run.compare_hard_labels: a hard-label student needs labels, but "
                                "data.label_column is not set — set data.label_column or "
                                "run.compare_hard_labels=false")
        problems += _corpus_problems(cfg, t_conf)
        return problems

    def describe(self) -> dict:
        d = self.cfg.data
        return {"task": self.name, "text_column": d.text_column, "text_pair_column": d.text_pair_column,
                "label_column": d.label_column}


# ---------------------------------------------------------------- label mapping

def label_names(t_conf) -> list[str]:
    return [str(t_conf.id2label[i]) for i in sorted(t_conf.id2label)]


def has_label_names(t_conf) -> bool:
    """False for transformers' placeholder names LABEL_0..: the config says nothing of the classes."""
    return not all(_DEFAULT_NAME.fullmatch(str(v)) for v in t_conf.id2label.values())


def map_labels(values, label2id: dict[str, int], num_labels: int) -> tuple[np.ndarray, list]:
    """Label values (str / int / None) -> class ids (-100 for None), and the values that map to none."""
    out = np.full(len(values), IGNORE, dtype=np.int64)
    unknown = []
    for i, v in enumerate(values):
        if v is None:
            continue
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (str, int, np.integer)):
            unknown.append(v)
        elif isinstance(v, str):
            if v in label2id:
                out[i] = label2id[v]
            else:
                unknown.append(v)
        elif 0 <= int(v) < num_labels:
            out[i] = int(v)
        else:
            unknown.append(v)
    return out, unknown


def _corpus_problems(cfg, t_conf) -> list[str]:
    """The corpus's columns exist and every label value maps to a teacher class."""
    from ..data import resolve_corpus

    d = cfg.data
    wanted = [c for c in (d.text_pair_column, d.label_column) if c]
    fs, files, fmt = resolve_corpus(d)  # checks data.text_column too
    values, problems = [], []
    for path in files:
        names, table = _read_columns(fs, path, fmt, wanted)
        if table.num_rows == 0:
            continue
        missing = [c for c in wanted if c not in names]
        for c in missing:
            key = "data.text_pair_column" if c == d.text_pair_column else "data.label_column"
            problems.append(f"{key}: column {c!r} is not in {path} (columns: "
                            f"{', '.join(names[:10])}) — set {key} to a column of the corpus"
                            + (", or null for unlabelled data" if key == "data.label_column" else ""))
        if d.label_column and d.label_column not in missing:
            values.extend(table.column(d.label_column).to_pylist())
        if d.max_rows and len(values) >= d.max_rows:
            values = values[:d.max_rows]
            break
    if problems or not d.label_column:
        return problems
    names = label_names(t_conf)
    strings = sorted({v for v in values if isinstance(v, str)})
    if strings and not has_label_names(t_conf):
        return [f"data.label_column: column {d.label_column!r} holds label names ({_few(strings)}) but the "
                f"teacher {cfg.teacher.model} has no label names (id2label is {', '.join(names)}) — "
                f"write id2label / label2id into its config.json, or use class ids 0..{len(names) - 1}"]
    _, unknown = map_labels(values, {str(k): int(v) for k, v in t_conf.label2id.items()}, len(names))
    if unknown:
        problems.append(f"data.label_column: column {d.label_column!r} holds values the teacher "
                        f"{cfg.teacher.model} has no class for: {_few(sorted(set(map(repr, unknown))))} "
                        f"({len(unknown)} rows) — the teacher's classes are {', '.join(names)} (or ids "
                        f"0..{len(names) - 1}); fix or drop those rows, null marks an unlabelled row")
    return problems


def _read_columns(fs, path: str, fmt: str, wanted: list[str]) -> tuple[list[str], pa.Table]:
    """(every column name of the file, the table of those of `wanted` it has): Parquet reads only
    those columns (a large text column is never loaded here); JSONL has to be parsed whole."""
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    opener = fs.open if fs is not None else open
    with opener(path, "rb") as f:
        if fmt == "parquet":
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            table = pf.read(columns=[c for c in wanted if c in names])
            return names, table if table.num_columns else pa.table({"_": np.zeros(pf.metadata.num_rows)})
        table = pajson.read_json(f)
    return table.column_names, table


def _few(values: list, n: int = 5) -> str:
    shown = ", ".join(str(v) for v in values[:n])
    return shown + (f", ... ({len(values)} distinct)" if len(values) > n else "")


# ---------------------------------------------------------------- Ray Data stage (workers)

_TOKENIZERS: dict = {}


def _load_tokenizer(path: str, trust_remote_code: bool):
    """One tokenizer per process: Ray reuses its workers across tasks."""
    key = (os.path.expanduser(path), trust_remote_code)
    if key not in _TOKENIZERS:
        from ..models import load_tokenizer

        _TOKENIZERS[key] = load_tokenizer(key[0], trust_remote_code=trust_remote_code)
    return _TOKENIZERS[key]


def tokenize_examples(batch: dict, *, tokenizer_path: str, trust_remote_code: bool, text_column: str,
                      text_pair_column: str | None, label_column: str | None, label2id: dict,
                      num_labels: int, seq_len: int) -> dict:
    """A batch of corpus rows -> one input row per example (the contract of `data.tokenize_and_pack`):
    input_ids [n, seq_len], labels [n, 1], valid [n]; the first row carries the batch's counts.
    A row whose text (or pair text) is empty or not a string is skipped and counted."""
    texts = [_text(v) for v in batch[text_column]]
    pairs = [_text(v) for v in batch[text_pair_column]] if text_pair_column else [""] * len(texts)
    keep = [i for i, (a, b) in enumerate(zip(texts, pairs)) if a is not None and b is not None]
    n = max(len(keep), 1)
    ids = np.zeros((n, seq_len), dtype=np.int64)
    labels = np.full((n, 1), IGNORE, dtype=np.int64)
    if keep:
        tok = _load_tokenizer(tokenizer_path, trust_remote_code)
        enc = tok([texts[i] for i in keep], [pairs[i] for i in keep] if text_pair_column else None,
                  truncation=True, max_length=seq_len, padding="max_length")
        ids[:] = np.asarray(enc["input_ids"], dtype=np.int64)
        if label_column:
            mapped, unknown = map_labels([_py(batch[label_column][i]) for i in keep], label2id, num_labels)
            if unknown:  # preflight refuses these; a corpus that changed since is refused here
                raise ValueError(f"data.label_column: values with no teacher class: {_few(unknown)}")
            labels[:, 0] = mapped
    docs, skipped = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    docs[0], skipped[0] = len(keep), len(texts) - len(keep)
    return {"input_ids": ids, "labels": labels, "valid": np.full(n, bool(keep)), "docs": docs, "skipped": skipped}


def _text(v) -> str | None:
    """A usable text, or None (empty, not a string, not UTF-8)."""
    if isinstance(v, (bytes, bytearray)):
        try:
            v = bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            return None
    return v if isinstance(v, str) and v.strip() else None


def _py(v):
    """numpy scalars from a Ray Data batch -> Python values (None for NaN / null)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        return None if v != v else (int(v) if v.is_integer() else v)
    return v


# ---------------------------------------------------------------- metrics

def classification_metrics(logp, labels, *, teacher_logp=None) -> dict:
    """Held-out figures of one model from its log-probs [N, C] and labels [N] (-100: unlabelled).

    accuracy, macro_f1 (mean F1 over classes that occur in the labels or the predictions), ce
    (NLL of the label), ece (expected calibration error over ECE_BINS equal-width confidence bins)
    and confusion [true][predicted] use the labelled rows; with `teacher_logp`: top1_agreement
    (argmax equal to the teacher's) and kl_teacher_student (mean KL(p_T ‖ q_S) at T = 1) use every row.
    """
    import torch
    import torch.nn.functional as F

    logp = logp.float()
    c = logp.shape[-1]
    out: dict = {}
    if teacher_logp is not None:
        t = teacher_logp.float()
        out["top1_agreement"] = float((logp.argmax(-1) == t.argmax(-1)).double().mean())
        out["kl_teacher_student"] = float(F.kl_div(logp, t, log_target=True, reduction="none").sum(-1)
                                          .double().mean())
    mask = labels != IGNORE
    if not bool(mask.any()):
        return out
    lp, y = logp[mask], labels[mask].long()
    pred = lp.argmax(-1)
    confusion = torch.zeros(c, c, dtype=torch.long)
    confusion.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    tp = confusion.diag().double()
    support, predicted = confusion.sum(1).double(), confusion.sum(0).double()
    present = (support + predicted) > 0
    f1 = 2 * tp / (support + predicted).clamp_min(1)
    conf = lp.exp().max(-1).values.double()
    correct = (pred == y).double()
    bins = (conf * ECE_BINS).long().clamp(max=ECE_BINS - 1)
    ece = sum(float((conf[bins == b] - correct[bins == b]).sum().abs()) for b in range(ECE_BINS)) / len(y)
    out.update(accuracy=float(correct.mean()), macro_f1=float(f1[present].mean()),
               ce=float(-lp.gather(-1, y.unsqueeze(-1)).double().mean()), ece=ece,
               confusion=confusion.tolist())
    return out
