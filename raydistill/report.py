"""The figures of a run on disk: `report.json`, a readable `report.md` and PNG plots.

    <output_dir>/
      report.json      the report dict as given (JSON, indent 2)
      report.md        summary tables + the plots below embedded as images
      loss.png         train loss / kd / ce vs step, one colour per run in report["history"]
      staleness.png    max and mean shard age vs step (report["ages"]), the bound as a line
      throughput.png   teacher-pass tokens/s, one bar per pass (report["teacher_passes"])
      confusion.png    classifiers: confusion matrices [true][predicted] of teacher and students
                       (report["eval"][model]["confusion"], class names from eval["label_names"])

Every file is written to a temporary name and renamed, so a reader never sees half a report. A
plot whose data is missing or empty is not drawn (and a stale one from an earlier write of the same
directory is removed, so report.md and the PNGs always agree).

Report keys (all optional except `run`):

    run:            {name, mode, output_dir}
    phases:         {phase: seconds}
    teacher_passes: [{source, step, shards, rows, tokens, seconds, rows_per_s, tokens_per_s}]
    store:          {bytes, tokens, bytes_per_token, format, shards}
    train:          {steps, tokens_per_s, final_loss, resumed_from_step}
    history:        {run_label: [{step, loss, kd, ce, tokens_per_s}]}
    eval:           {"student": {...}, "teacher": {...}, "hard_label_student": {...}, "tokens": n}
                    (the per-model dicts of `evaluate.evaluate`; a whole `evaluate` result is accepted too;
                    with data.answer_column each also has "answer_accuracy", and "answers": {prompts, matched})
    refresh:        {policy, fraction, every_steps, source, passes, rows_refreshed, max_age_seen, bound_steps}
    ages:           [{step, max_age, mean_age}]
    teachers:       several teachers: {name: {model, weight, teacher_rev, routed_rows, mixture_rows, rows,
                    tokens, teacher_tokens: {initial, refresh}, teacher_seconds, max_age, max_age_seen}}
                    (teachers.report_section); eval["teachers"]: {name: {all_rows, own_rows}}
"""
from __future__ import annotations

import io
import itertools
import json
import math
import numbers
import os

from .fsutil import atomic_write

__all__ = ["build_report", "write_report"]

PLOTS = ("loss.png", "staleness.png", "throughput.png", "confusion.png")


def build_report(cfg, store, *, out_dir: str, phases: dict, inputs: dict, passes: list, state: dict,
                 total_steps: int, history: dict, evaluation: dict, students: dict,
                 refresh: dict | None) -> dict:
    """The report dict of one run (keys above) from what its phases returned."""
    from .refresh import teacher_compute

    t = cfg.train
    tokens = [h["tokens_per_s"] for h in state["history"]]
    report = {
        "run": {"name": cfg.run.name, "mode": cfg.mode, "output_dir": out_dir, "store": store.uri},
        "config": cfg.to_dict(),
        "phases": phases,
        "inputs": inputs,
        "teacher_passes": passes,
        "store": dict(store.summary(), format=cfg.targets.format),
        "train": {"steps": state["step"], "total_steps": total_steps,
                  "tokens_per_s": sum(tokens) / len(tokens) if tokens else None,
                  "final_loss": state["history"][-1]["loss"] if state["history"] else None,
                  "resumed_from_step": state.get("resumed_from")},
        "history": history,
        "eval": evaluation,
        "outputs": {"student": students["student"], "report": os.path.join(out_dir, "report.json")},
    }
    # Online mode: the teacher's forward runs inside every step, over every token trained on.
    online = state["step"] * max(t.workers, 1) * t.batch_size * t.grad_accum * cfg.data.seq_len
    report["teacher_compute"] = teacher_compute(passes, refresh, online_tokens=online if t.online else 0)
    if cfg.teachers:
        from .teachers import report_section

        report["teachers"] = report_section(cfg, store, passes, refresh, state["step"])
    if refresh is not None:
        refresh = dict(refresh)
        report["ages"] = refresh.pop("ages")
        report["refresh"] = refresh
    return report


def write_report(output_dir: str, report: dict) -> dict[str, str]:
    """Write report.json, report.md and the plots that have data into `output_dir`.

    Returns {file name: path} for every file written, e.g. {"report.json": ..., "loss.png": ...}.
    """
    if not isinstance(report, dict) or not isinstance(report.get("run"), dict):
        raise ValueError("report must be a dict with a 'run' dict ({name, mode, output_dir}) — "
                         "build it with the run's config before writing")
    os.makedirs(output_dir, exist_ok=True)
    written: dict[str, str] = {}

    path = os.path.join(output_dir, "report.json")
    atomic_write(path, (json.dumps(report, indent=2, default=_json_default) + "\n").encode())
    written["report.json"] = path

    for name, draw in (("loss.png", _plot_loss), ("staleness.png", _plot_staleness),
                       ("throughput.png", _plot_throughput), ("confusion.png", _plot_confusion)):
        path = os.path.join(output_dir, name)
        png = draw(report)
        if png is None:
            if os.path.exists(path):
                os.remove(path)
            continue
        atomic_write(path, png)
        written[name] = path

    path = os.path.join(output_dir, "report.md")
    atomic_write(path, _markdown(report, [n for n in PLOTS if n in written]).encode())
    written["report.md"] = path
    return written


# ---------------------------------------------------------------------------------------- files


def _json_default(o):
    # numpy / torch scalars and arrays, paths: what a pipeline naturally puts in a report.
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"report value of type {type(o).__name__} is not JSON serialisable: {o!r}")


# ------------------------------------------------------------------------------------- markdown


def _num(v):
    """A plain float/int from v (numpy scalars included), or None."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, numbers.Number):
        return v
    if hasattr(v, "item"):
        try:
            return v.item()
        except (TypeError, ValueError):
            return None
    return None


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    n = _num(v)
    if n is None:
        return str(v).replace("|", "\\|")
    if isinstance(n, numbers.Integral):
        return f"{int(n):,}"
    n = float(n)
    if not math.isfinite(n):
        return str(n)
    if n == 0:
        return "0"
    if abs(n) < 1e-3:
        return f"{n:.2e}"
    if abs(n) < 1000:
        return f"{n:.4f}"
    return f"{n:,.1f}"


def _bytes(n) -> str:
    n = _num(n)
    if n is None:
        return "—"
    size, unit = float(n), "B"
    for u in ("KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024:
            break
        size, unit = size / 1024, u
    return f"{int(n):,} B" if unit == "B" else f"{int(n):,} B ({size:.1f} {unit})"


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c if isinstance(c, str) else _fmt(c) for c in r) + " |" for r in rows]
    return out + [""]


def _rate(p: dict, key: str, num: str):
    v = _num(p.get(key))
    if v is None:
        n, s = _num(p.get(num)), _num(p.get("seconds"))
        v = n / s if n is not None and s else None
    return v


def _eval_part(ev: dict, key: str, role: str) -> dict | None:
    d = ev.get(key)
    if not isinstance(d, dict):
        return None
    # A whole evaluate() result ({"student": {...}, "teacher": {...}, "tokens"}) is accepted too.
    if "ce" not in d and isinstance(d.get(role), dict):
        d = d[role]
    return d


def _markdown(r: dict, plots: list[str]) -> str:
    run = r["run"]
    lines = [f"# raydistill report: {run.get('name') or '(unnamed run)'}", ""]
    lines += [f"- mode: `{run.get('mode', '—')}`", f"- output dir: `{run.get('output_dir', '—')}`", ""]

    phases = r.get("phases") or {}
    if phases:
        total = sum(float(_num(v) or 0) for v in phases.values())
        rows = [[str(k), _num(v), f"{100 * (_num(v) or 0) / total:.1f}%" if total else "—"]
                for k, v in phases.items()]
        rows.append(["**total**", total, "100.0%" if total else "—"])
        lines += ["## Phases (wall time)", ""] + _table(["phase", "seconds", "share"], rows)

    passes = r.get("teacher_passes") or []
    if passes:
        rows = [[str(i), str(p.get("source", "—")), p.get("step"), p.get("shards"), p.get("rows"),
                 p.get("tokens"), p.get("seconds"), _rate(p, "rows_per_s", "rows"),
                 _rate(p, "tokens_per_s", "tokens")] for i, p in enumerate(passes)]
        lines += ["## Teacher passes", ""]
        lines += _table(["#", "source", "step", "shards", "rows", "tokens", "seconds", "rows/s",
                         "tokens/s"], rows)
        secs = sum(float(_num(p.get("seconds")) or 0) for p in passes)
        if secs > 0:
            rows_all = sum(_num(p.get("rows")) or 0 for p in passes)
            toks_all = sum(_num(p.get("tokens")) or 0 for p in passes)
            lines += [f"All passes: {_fmt(rows_all)} rows, {_fmt(toks_all)} tokens in "
                      f"{_fmt(secs)} s = {_fmt(rows_all / secs)} rows/s, "
                      f"{_fmt(toks_all / secs)} tokens/s.", ""]

    teachers = r.get("teachers") or {}
    if teachers:
        per_eval = (r.get("eval") or {}).get("teachers") or {}

        def ce(name, part):
            return ((per_eval.get(name) or {}).get(part) or {}).get("student", {}).get("ce")
        rows = [[n, t.get("weight"), t.get("routed_rows"), t.get("mixture_rows"), t.get("tokens"),
                 sum((t.get("teacher_tokens") or {}).values()), t.get("teacher_seconds"), t.get("max_age"),
                 t.get("max_age_seen"), ce(n, "own_rows"), ce(n, "all_rows")] for n, t in teachers.items()]
        lines += ["## Teachers", ""]
        lines += _table(["teacher", "weight", "routed rows", "mixture rows", "tokens", "teacher tokens",
                         "teacher s", "max age", "max age seen", "student CE (own rows)", "student CE (all rows)"], rows)

    store = r.get("store") or {}
    if store:
        lines += ["## Soft-target store", ""]
        lines += _table(["", ""], [["format", str(store.get("format", "—"))],
                                   ["shards", store.get("shards")],
                                   ["bytes", _bytes(store.get("bytes"))],
                                   ["tokens", store.get("tokens")],
                                   ["bytes / token", store.get("bytes_per_token")]])

    train = r.get("train") or {}
    if train:
        rows = [["steps", train.get("steps")], ["tokens/s", train.get("tokens_per_s")],
                ["final loss", train.get("final_loss")]]
        if train.get("resumed_from_step") is not None:
            rows.append(["resumed from step", train.get("resumed_from_step")])
        lines += ["## Training", ""] + _table(["", ""], rows)

    ev = r.get("eval") or {}
    cols = [(k, role, title) for k, role, title in
            (("student", "student", "student"), ("teacher", "teacher", "teacher"),
             ("hard_label_student", "student", "hard-label student"))
            if _eval_part(ev, k, role) is not None]
    if cols:
        parts = [_eval_part(ev, k, role) for k, role, _ in cols]
        metrics = [("ce", "cross-entropy (nats)"), ("perplexity", "perplexity"),
                   ("kl_teacher_student", "KL(teacher ‖ student)"),
                   ("top1_agreement", "top-1 agreement with teacher"),
                   ("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("ece", "expected calibration error"),
                   ("answer_accuracy", "answer accuracy (greedy, held-out prompts)")]
        rows = [[label] + [p.get(key) for p in parts] for key, label in metrics
                if any(p.get(key) is not None for p in parts)]
        lines += ["## Evaluation (held-out)", ""]
        lines += _table(["metric"] + [t for _, _, t in cols], rows)
        tokens = ev.get("tokens")
        if tokens is None:
            tokens = next((ev[k].get("tokens") for k, _, _ in cols if "tokens" in ev[k]), None)
        if tokens is not None:
            lines += [f"Evaluated on {_fmt(tokens)} tokens.", ""]
        answers = ev.get("answers") or {}
        if answers:  # raydistill.answers: held-out prompts matched to a gold answer
            lines += [f"Answer accuracy over {_fmt(answers.get('matched'))} of {_fmt(answers.get('prompts'))} "
                      "held-out prompts (those with a gold answer in data.answer_column).", ""]

    ref = r.get("refresh") or {}
    if ref:
        keys = [("policy", "policy"), ("fraction", "fraction"), ("every_steps", "every steps"),
                ("source", "source"), ("passes", "refresh passes"),
                ("rows_refreshed", "rows refreshed"), ("max_age_seen", "max shard age seen"),
                ("bound_steps", "age bound (steps)")]
        lines += ["## Refresh", ""] + _table(["", ""], [[label, ref.get(k)] for k, label in keys
                                                          if k in ref])
        seen, bound = _num(ref.get("max_age_seen")), _num(ref.get("bound_steps"))
        if seen is not None and bound is not None:
            verdict = "within" if seen <= bound else "**exceeds**"
            lines += [f"Max shard age seen {_fmt(seen)} {verdict} the bound of {_fmt(bound)} steps.", ""]

    if plots:
        lines += ["## Plots", ""]
        for name in plots:
            lines += [f"![{name[:-4]}]({name})", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- plots


def _figure():
    # Figure + Agg canvas directly: no pyplot global state, no backend switch for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _series(points: list, key: str) -> tuple[list, list]:
    xs, ys = [], []
    for p in points or []:
        if not isinstance(p, dict):
            continue
        x, y = _num(p.get("step")), _num(p.get(key))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def _plot_loss(r: dict) -> bytes | None:
    history = r.get("history") or {}
    if not isinstance(history, dict):
        return None
    fig, ax = _figure()
    colors = [f"C{i % 10}" for i in range(len(history))]
    drawn = 0
    for color, (label, points) in zip(colors, history.items()):
        for key, style in (("loss", "-"), ("kd", "--"), ("ce", ":")):
            xs, ys = _series(points, key)
            if xs:
                ax.plot(xs, ys, style, color=color, label=f"{label} {key}")
                drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("student step")
    ax.set_ylabel("loss (nats)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)


def _plot_staleness(r: dict) -> bytes | None:
    ages = r.get("ages") or []
    fig, ax = _figure()
    drawn = 0
    for key, label in (("max_age", "max shard age"), ("mean_age", "mean shard age")):
        xs, ys = _series(ages, key)
        if xs:
            ax.plot(xs, ys, marker=".", label=label)
            drawn += 1
    if not drawn:
        return None
    ref = r.get("refresh") or {}
    bound = _num(ref.get("max_age")) or _num(ref.get("bound_steps"))
    if bound is not None:
        ax.axhline(bound, color="red", linestyle="--", label=f"bound ({_fmt(bound)} steps)")
    ax.set_xlabel("student step")
    ax.set_ylabel("age (student steps)")
    ax.set_title("Soft-target staleness")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    # The cost of an enforced bound: training's waits, cumulative, at the step each pass landed.
    stalls = [(_num(p.get("commit_step")), _num(p.get("stall_s")) or 0.0) for p in ref.get("pass_log") or []
              if isinstance(p, dict) and _num(p.get("commit_step")) is not None]
    if any(s for _, s in stalls):
        ax2 = ax.twinx()
        ax2.step([x for x, _ in stalls], list(itertools.accumulate(s for _, s in stalls)), where="post",
                 color="gray", label=f"training stalled, s ({_num(ref.get('stall_share')) or 0.0:.0%} of its time)")
        ax2.set_ylabel("stall (s, cumulative)")
        ax2.set_ylim(bottom=0)
        h2 = ax2.get_legend_handles_labels()
        handles = (handles[0] + h2[0], handles[1] + h2[1])
    ax.legend(*handles, fontsize="small")
    return _png(fig)


def _plot_throughput(r: dict) -> bytes | None:
    passes = [p for p in (r.get("teacher_passes") or []) if isinstance(p, dict)]
    bars = [(i, p, _rate(p, "tokens_per_s", "tokens")) for i, p in enumerate(passes)]
    bars = [b for b in bars if b[2] is not None]
    if not bars:
        return None
    fig, ax = _figure()
    sources = list(dict.fromkeys(str(p.get("source", "?")) for _, p, _ in bars))
    for s_i, source in enumerate(sources):
        mine = [(i, v) for i, p, v in bars if str(p.get("source", "?")) == source]
        ax.bar([i for i, _ in mine], [v for _, v in mine], color=f"C{s_i % 10}", label=source)
    if len(bars) <= 30:  # beyond that the labels overlap; the axis numbers the passes anyway
        ax.set_xticks([i for i, _, _ in bars])
        ax.set_xticklabels([f"{i}\n@{p.get('step', '?')}" for i, p, _ in bars], fontsize="small")
    ax.set_xlabel("teacher pass (@ student step)")
    ax.set_ylabel("tokens/s")
    ax.set_title("Teacher pass throughput")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    return _png(fig)


def _plot_confusion(r: dict) -> bytes | None:
    """One confusion-matrix panel per evaluated classifier (rows: true class, columns: predicted)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ev = r.get("eval") or {}
    models = [(k, ev[k]["confusion"]) for k in ("teacher", "student_init", "student", "hard_label_student")
              if isinstance(ev.get(k), dict) and ev[k].get("confusion")]
    if not models:
        return None
    n = len(models[0][1])
    names = [str(x) for x in ev.get("label_names") or range(n)]
    fig = Figure(figsize=(3.2 * len(models) + 0.5, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, (label, matrix) in enumerate(models):
        ax = fig.add_subplot(1, len(models), i + 1)
        ax.imshow(matrix, cmap="Blues")
        for row in range(n):
            for col in range(n):
                ax.text(col, row, str(matrix[row][col]), ha="center", va="center", fontsize="small")
        ax.set_xticks(range(n), names, rotation=45, fontsize="small")
        ax.set_yticks(range(n), names if i == 0 else [""] * n, fontsize="small")
        ax.set_title(label.replace("_", " "), fontsize="medium")
        ax.set_xlabel("predicted")
    fig.axes[0].set_ylabel("true")
    return _png(fig)
