"""Where a command's CPU goes, by process: run it, sample /proc every 0.5 s, print CPU seconds per process kind.

    python bench/cpu_by_process.py -- .venv/bin/python -m pytest -q tests/test_train.py

Ray renames its workers (`ray::IDLE`, then `ray::RayTrainWorker`, ...), so a process is keyed by pid and start
time and named by the last title it had; CPU is counted from the first sample, so processes that ran before the
command only add what they used during it. A process that lives under 0.5 s may be missed (an undercount).
Linux only. Used to find what a test suite that keeps both cores busy spends them on.
"""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def sample(seen: dict, base: dict, first: bool) -> None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        comm, rest = stat[stat.find("(") + 1:stat.rfind(")")], stat[stat.rfind(")") + 2:].split()
        cpu, key = (int(rest[11]) + int(rest[12])) / TICK, (pid, rest[19])   # utime+stime, start time
        name = argv[0].decode(errors="replace")
        if not name:
            name = f"[{comm}]"  # a kernel thread, or a process that has exited
        elif not name.startswith("ray::"):
            name = " ".join(a.decode(errors="replace").rsplit("/", 1)[-1] for a in argv[:2])[:50]
        if first:
            base[key] = cpu
        if name.startswith("[") and key in seen:
            name = seen[key][1]  # an exited process keeps the title it last had
        seen[key] = (cpu - base.get(key, 0.0), name)


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    seen: dict = {}
    base: dict = {}
    start = time.monotonic()
    sample(seen, base, first=True)
    proc = subprocess.Popen(argv[argv.index("--") + 1:])
    while proc.poll() is None:
        time.sleep(0.5)
        sample(seen, base, first=False)
    wall = time.monotonic() - start
    kinds: dict = collections.defaultdict(lambda: [0.0, 0])
    for cpu, name in seen.values():
        if cpu > 0:
            kind = kinds[name.split(".")[0] if name.startswith("ray::") else name]  # ray::Actor.method -> actor
            kind[0] += cpu
            kind[1] += 1
    total = sum(c for c, _ in kinds.values())
    print(f"wall {wall:.0f} s, CPU {total:.0f} s ({total / wall:.2f} cores busy), exit {proc.returncode}")
    for kind, (cpu, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0])[:30]:
        print(f"{cpu:8.1f} s  {n:4d} processes  {cpu / n:5.1f} s each  {kind}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
