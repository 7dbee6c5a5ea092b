"""Optional sampling profiles of Ray worker processes with py-spy (`run.py --profile`).

A background thread waits for a descendant of this driver whose command line matches (our own
Ray cluster's workers only: the machine may run other people's Ray clusters), records it with
`py-spy record --format raw` (collapsed stacks) for a while, and summarises the samples: share of
samples whose stack contains a function (inclusive) and the top leaf functions (self time).
Profiling costs CPU on a 2-core machine, so the timed rows are measured without it unless asked.
"""
from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import threading
import time

import psutil


def _find(match: str, timeout_s: float) -> psutil.Process | None:
    me = psutil.Process()
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for p in me.children(recursive=True):
            try:
                if match in " ".join(p.cmdline()):
                    return p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.25)
    return None


def py_spy() -> str | None:
    exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return exe if os.path.exists(exe) else shutil.which("py-spy")


class Profile:
    """with Profile("RayTrainWorker", "out.txt", delay_s=10, duration_s=15) as prof: ...; prof.summary"""

    def __init__(self, match: str, out: str, *, delay_s: float = 0.0, duration_s: float = 15.0, rate: int = 50):
        self.match, self.out, self.delay_s, self.duration_s, self.rate = match, out, delay_s, duration_s, rate
        self.summary: dict | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = threading.Event()

    def __enter__(self):
        if py_spy():
            self._thread.start()
        else:
            self.summary = {"error": "py-spy not installed"}
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        return False

    def _run(self):
        proc = _find(self.match, timeout_s=120)
        if proc is None:
            self.summary = {"error": f"no process matching {self.match!r}"}
            return
        if self._stop.wait(self.delay_s):
            self.summary = {"error": "finished before the profile started"}
            return
        os.makedirs(os.path.dirname(self.out), exist_ok=True)
        cmd = [py_spy(), "record", "--pid", str(proc.pid), "--duration", str(int(self.duration_s)),
               "--rate", str(self.rate), "--format", "raw", "--output", self.out, "--nonblocking"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not os.path.exists(self.out):
            self.summary = {"error": (res.stderr or res.stdout).strip()[-400:]}
            return
        self.summary = summarize(self.out)
        self.summary["pid"] = proc.pid


def summarize(path: str, top: int = 12) -> dict:
    leaf = collections.Counter()
    inclusive = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(n)
            total += n
            frames = stack.split(";")
            leaf[_short(frames[-1])] += n
            for fr in set(_short(x) for x in frames):
                inclusive[fr] += n
    pct = lambda c: round(100.0 * c / max(total, 1), 1)  # noqa: E731
    return {"samples": total,
            "top_self": [(f, pct(c)) for f, c in leaf.most_common(top)],
            "top_inclusive": [(f, pct(c)) for f, c in inclusive.most_common(top * 3)
                              if not f.startswith(("<module>", "main ", "_bootstrap"))][:top * 2]}


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    return f"{name} ({os.path.basename(where.rsplit(':', 1)[0])})" if where else name
