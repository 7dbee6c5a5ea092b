"""Answer accuracy on checkable answers (`data.answer_column`): teacher and students answer the held-out
prompts by greedy generation, and the text after `rationale.answer_prefix` is compared with the gold.

The held-out prompts are the eval rows' prompts (`instruct.prompt_ids`), with `generate.prompt_template`
applied when the run's teacher wrote its training rows from templated prompts (generate.enabled), so
each model is asked as it was trained. A prompt's gold answer is the `data.answer_column` value of the
corpus row whose `data.prompt_column` text it decodes to (prompt_response rows: the prompt tokens are
the prompt text's own tokens). Runs in one Ray task placed like a teacher replica.
"""
from __future__ import annotations

import os


def parse_answer(text: str, prefix: str | None) -> str | None:
    """The answer in a generated response: the first line after the last `prefix` (the whole first
    line without a prefix), stripped; None when the prefix is missing."""
    if prefix is not None:
        if prefix not in text:
            return None
        text = text.rpartition(prefix)[2]
    return text.strip().split("\n", 1)[0].strip()


def gold_answers(cfg) -> dict[str, str]:
    """{prompt text (stripped): answer} from the corpus."""
    from .data import _corpus_columns, resolve_corpus

    d = cfg.data
    fs, files, fmt = resolve_corpus(d)
    gold: dict[str, str] = {}
    for chunk in _corpus_columns(fs, files, fmt, [d.prompt_column, d.answer_column]):
        for p, a in zip(chunk[d.prompt_column], chunk[d.answer_column]):
            if isinstance(p, str) and a is not None:
                gold.setdefault(p.strip(), str(a).strip())
    return gold


def add_answer_accuracy(cfg, store, students: dict, evaluation: dict, max_rows: int = 512) -> dict:
    """`evaluation` with "answer_accuracy" in the teacher's and each student's figures (and the counts
    under "answers"); unchanged without data.answer_column or held-out rows."""
    import ray

    from .cluster import teacher_options

    if cfg.data.answer_column is None or not isinstance(evaluation.get("teacher"), dict):
        return evaluation
    task = ray.remote(_answer_task).options(**teacher_options(cfg.teacher))
    manifest = store.manifest()
    width = manifest["tokenizer"].get("width")  # W: greedy answers never pick an id a head pads
    res = ray.get(task.remote(cfg.to_dict(), students, (store.uri, manifest["inputs"]["eval"]), max_rows, width))
    out = dict(evaluation, answers=res.pop("counts"))
    for label, acc in res.items():
        out[label] = dict(out.get(label) or {}, answer_accuracy=acc)
    return out


def _answer_task(cfg_dict: dict, students: dict, eval_uri: tuple, max_rows: int, width: int | None = None) -> dict:
    from .config import Config
    from .store import SoftTargetStore
    from .tasks import get_task

    cfg = Config.from_dict(cfg_dict, check_paths=False)
    task, t = get_task(cfg), cfg.teacher
    table = SoftTargetStore(eval_uri[0]).read_input_file(eval_uri[1]).slice(0, max_rows)
    models = {"teacher": (os.path.expanduser(t.model), "teacher.model")}
    models.update({label: (path, label) for label, path in students.items()})
    out, counts = {}, None
    for label, (path, key) in models.items():
        model = task.load_model(path, dtype="float32", trust_remote_code=t.trust_remote_code, key=key)
        acc, counts = answer_accuracy(cfg, model, table, vocab_size=width)
        out[label] = acc
    return dict(out, counts=counts)


def answer_accuracy(cfg, model, eval_table, vocab_size: int | None = None) -> tuple[float | None, dict]:
    """(share of matched held-out prompts `model` answers correctly, {prompts, matched}); greedy
    generation over ids < `vocab_size` (the run's W) when given."""
    from .generate_pass import apply_template, generate_batch
    from .instruct import pad_id_of, prompt_ids
    from .models import load_tokenizer

    tok = load_tokenizer(cfg.teacher.model, trust_remote_code=cfg.teacher.trust_remote_code)
    gold, template = gold_answers(cfg), cfg.generate.prompt_template if cfg.generate.enabled else None
    asked = []
    for ids, mask in zip(eval_table["input_ids"].to_pylist(), eval_table["loss_mask"].to_pylist()):
        p = prompt_ids(ids, mask)
        want = gold.get(tok.decode(p).strip())
        if want is not None:
            asked.append((apply_template(tok, p, template), want))
    correct, bs, seq_len = 0, cfg.teacher.batch_size, cfg.data.seq_len
    model.eval()
    for lo in range(0, len(asked), bs):
        chunk = asked[lo:lo + bs]
        room = max(1, min(cfg.generate.max_new_tokens, seq_len - max(len(p) for p, _ in chunk)))
        responses = generate_batch(model, [p for p, _ in chunk], pad_id=pad_id_of(tok), eos_id=tok.eos_token_id,
                                   max_new_tokens=room, vocab_size=vocab_size)
        for r, (_, want) in zip(responses, chunk):
            correct += parse_answer(tok.decode(r, skip_special_tokens=True), cfg.rationale.answer_prefix) == want
    counts = {"prompts": eval_table.num_rows, "matched": len(asked)}
    return (correct / len(asked) if asked else None), counts
