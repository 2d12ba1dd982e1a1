#!/usr/bin/env python3
"""Samples a block device's requests in flight as fast as it can and prints the trace.

    python3 bench/profile/inflight.py [DEVICE] [SECONDS]    (defaults: vda 0.3)

Run it while a job is under way (fio alone on the device, or a server under fio). It
reads /sys/block/DEVICE/inflight (reads + writes) in a loop and prints the samples as
runs ("from-to µs: count") and a histogram of the counts. The averages the harness
records (time in queue over wall time) cannot tell a disk that always holds half the
job's requests from one that holds all of them half the time and none the rest; this
trace can (docs/perf/profile.md, 2026-12-06 13:00).

The sampler is a process like any other: on a machine whose cores are all busy (a
busy-polling server on one, the client on the other) it is descheduled for hundreds of
microseconds at a time, so gaps between runs are its own, and a long run of zeros can
be a server it preempted. Trust the traces taken where a core has time to spare (fio
alone, or jobs that leave the client's core idle).
"""

import collections
import sys
import time


def main():
    dev = sys.argv[1] if len(sys.argv) > 1 else "vda"
    secs = float(sys.argv[2]) if len(sys.argv) > 2 else 0.3
    samples = []
    with open(f"/sys/block/{dev}/inflight", "rb") as f:
        t0 = time.perf_counter()
        while (now := time.perf_counter()) - t0 < secs:
            f.seek(0)
            reads, writes = f.read().split()
            samples.append((now - t0, int(reads) + int(writes)))
    runs = []
    for t, n in samples:
        if runs and runs[-1][1] == n:
            runs[-1][2] = t
        else:
            runs.append([t, n, t])
    print(f"{len(samples)} samples over {secs} s of /sys/block/{dev}/inflight")
    print("  ".join(f"{a * 1e6:.0f}-{b * 1e6:.0f}us:{n}" for a, n, b in runs[:120]))
    hist = collections.Counter(n for _, n in samples)
    print("histogram (in flight: samples):", sorted(hist.items()))


if __name__ == "__main__":
    main()
