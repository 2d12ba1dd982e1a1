#!/usr/bin/env python3
"""What `compress` costs a push backup: a full backup of a disk into a fresh qcow2 image,
with and without compression, the appliance's `backup_start` against
qemu-storage-daemon's `blockdev-backup`, in alternating rounds.

    python3 bench/compress.py [--rounds 3] [--size 1G] [--work /var/tmp]

The disk is a raw file written by fio with buffers that compress to about half
(`buffer_compress_percentage=50`); the target is made by `qemu-img create` before each
run. Figures: the job's duration (from the call to the end of the job) and the target's
allocated size. Servers on CPU 0 (O_DIRECT, io_uring), nothing else running.
"""
import argparse, os, shutil, statistics, sys, tempfile, time

from benchlib import alternate, sh, start_appliance, start_qsd


def fresh_target(work, size):
    t = os.path.join(work, "t.qcow2")
    if os.path.exists(t):
        os.unlink(t)
    sh("qemu-img", "create", "-q", "-f", "qcow2", t, str(size))
    return t


def allocated(path):
    return os.stat(path).st_blocks * 512


def appliance(work, img, compress):
    target = fresh_target(work, os.path.getsize(img))
    # The target lies beside the disk: inside the allowed target directories.
    p, _, rpc = start_appliance(work, f'path = "{img}"\nformat = "raw"\n')
    try:
        call = rpc.call
        t0 = time.monotonic()
        r = call("backup_start", {"disk": "d", "target": target, "compress": compress})
        if "error" in r:
            sys.exit(f"backup_start: {r}")
        job = r["result"]["job"]
        while True:
            j = call("job_list", {"job": job})["result"]
            if j["state"] in ("concluded", "aborted"):
                break
            time.sleep(0.02)
        if j["state"] != "concluded":
            sys.exit(f"backup: {j}")
        secs = time.monotonic() - t0
    finally:
        p.terminate()
        p.wait()
    return secs, allocated(target)


def qsd(work, img, compress):
    target = fresh_target(work, os.path.getsize(img))
    p, _, q = start_qsd(work, [
        f"driver=file,node-name=f,filename={img},cache.direct=on,aio=io_uring",
        "driver=raw,node-name=d,file=f",
        f"driver=file,node-name=tf,filename={target},cache.direct=on,aio=io_uring",
        "driver=qcow2,node-name=t,file=tf"], "d")
    try:
        t0 = time.monotonic()
        r = q.send({"execute": "blockdev-backup",
                    "arguments": {"job-id": "j", "device": "d", "target": "t",
                                  "sync": "full", "compress": compress}})
        if "error" in r:
            sys.exit(f"blockdev-backup: {r}")
        while q.send({"execute": "query-block-jobs"})["return"]:
            time.sleep(0.02)
        secs = time.monotonic() - t0
    finally:
        p.terminate()
        p.wait()
    return secs, allocated(target)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--work", default="/var/tmp")
    o = ap.parse_args()
    work = tempfile.mkdtemp(prefix="compress-bench-", dir=o.work)
    try:
        img = os.path.join(work, "d.raw")
        sh("fio", "--name=fill", f"--filename={img}", f"--size={o.size}", "--rw=write",
           "--bs=1M", "--direct=1", "--buffer_compress_percentage=50", "--refill_buffers",
           "--buffer_compress_chunk=4k")
        combos = [(s, c) for s in ("appliance", "qsd") for c in (False, True)]
        res = alternate(combos, o.rounds, lambda c: (appliance if c[0] == "appliance" else qsd)(
            work, img, c[1]))
        mib = os.path.getsize(img) / (1 << 20)
        print(f"{o.rounds} alternating rounds, full backup of a {o.size} raw disk (data "
              f"compressing to about half) into a fresh qcow2; median (min..max)\n")
        print("| server | compress | MiB/s | target allocated (MiB) |")
        print("|---|---|---:|---:|")
        for (s, c) in combos:
            rates = [mib / r[0] for r in res[(s, c)]]
            size = statistics.median(r[1] for r in res[(s, c)]) / (1 << 20)
            print(f"| {s} | {'yes' if c else 'no'} | {statistics.median(rates):.0f} "
                  f"({min(rates):.0f}..{max(rates):.0f}) | {size:.0f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
