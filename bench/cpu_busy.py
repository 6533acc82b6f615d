#!/usr/bin/env python3
"""How busy the host's CPUs were between two snapshots of the first line of /proc/stat.

The figure scripts take `head -1 /proc/stat` before and after a measured run; every broker, the
load generator and the kernel share the same vCPUs, so this share says how much headroom a
latency figure was measured with.
"""
import sys


def busy_percent(before_line, after_line):
    """Share of CPU time (all CPUs) that was neither idle nor iowait, in percent."""
    fields = [line.split() for line in (before_line, after_line)]
    for f in fields:
        if len(f) < 6 or f[0] != "cpu":
            raise ValueError(f"not the aggregate cpu line of /proc/stat: {' '.join(f)!r}")
    before, after = ([int(v) for v in f[1:]] for f in fields)
    delta = [b - a for a, b in zip(before, after)]
    if any(d < 0 for d in delta):
        raise ValueError("the second snapshot is older than the first")
    total = sum(delta)
    idle = delta[3] + delta[4]  # idle, iowait
    return 100.0 * (total - idle) / total if total else 0.0


def busy_between(before_path, after_path):
    with open(before_path) as before, open(after_path) as after:
        return busy_percent(before.readline(), after.readline())


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: cpu_busy.py BEFORE AFTER  (files holding `head -1 /proc/stat`)")
    print(f"{busy_between(sys.argv[1], sys.argv[2]):.1f}")
