#!/usr/bin/env python3
"""Mirror throughput: the appliance's mirror job against QEMU's (qemu-storage-daemon,
QMP `blockdev-mirror`), on the same source image and the same kind of target, idle and
under the same fio write load over NBD, in alternating rounds.

    python3 bench/mirror.py [--rounds 3] [--size 2G] [--load-secs 60] [--speed BYTES/S]
                            [--work /var/tmp]

Per run: the time from starting the job to READY (the target caught up), the copy
rate (disk bytes over that time), and, under load, fio's IOPS meanwhile. The source is
a qcow2 image with every cluster allocated (converted from random data), so both copy
the whole disk; the target is a new qcow2 file of the same size. The servers run on
CPU 0, fio on CPU 1. A job not ready after --load-secs is reported as such (QEMU's
mirror under a write load it cannot outrun never becomes ready; the appliance's
`adaptive` copy mode switches to write-blocking and does). With --speed both jobs
copy at most that many bytes per second, which a write load then outruns.
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time

from benchlib import sh, start_appliance, start_qsd


def fio_load(sock, secs):
    return subprocess.Popen(
        ["taskset", "-c", "1", "fio", "--name=load", "--ioengine=nbd",
         f"--uri=nbd+unix:///d?socket={sock}", "--rw=randwrite", "--bs=4k", "--iodepth=8",
         "--time_based", f"--runtime={secs}", "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def fio_iops(p):
    p.terminate()
    out, _ = p.communicate()
    try:
        j = json.loads(out[out.index("{"):])
        return j["jobs"][0]["write"]["iops"]
    except (ValueError, KeyError):
        return 0.0


def run_appliance(work, src, load, secs, speed):
    tgt = os.path.join(work, "a-target.qcow2")
    p, sock, r = start_appliance(work, f'path = "{src}"\nformat = "qcow2"\n', idle="busy")
    try:
        fio = fio_load(sock, secs + 5) if load else None
        time.sleep(1 if load else 0)
        t0 = time.monotonic()
        j = r.send({"jsonrpc": "2.0", "id": 1, "method": "mirror_start",
                    "params": {"disk": "d", "target": tgt, "create": True, "speed": speed}})["result"]["job"]
        ready = None
        while time.monotonic() - t0 < secs:
            st = r.send({"jsonrpc": "2.0", "id": 2, "method": "job_list", "params": {"job": j}})["result"]
            if st["state"] == "ready":
                ready = time.monotonic() - t0
                break
            time.sleep(0.05)
        iops = fio_iops(fio) if fio else None
        r.send({"jsonrpc": "2.0", "id": 3, "method": "job_cancel", "params": {"job": j, "force": True}})
        return ready, iops
    finally:
        p.terminate()
        p.wait()
        if os.path.exists(tgt):
            os.remove(tgt)


def run_qsd(work, src, size, load, secs, speed):
    tgt = os.path.join(work, "q-target.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", tgt, str(size))
    p, sock, q = start_qsd(work, [
        f"driver=file,node-name=sf,filename={src},cache.direct=on,aio=io_uring",
        "driver=qcow2,node-name=src,file=sf",
        f"driver=file,node-name=tf,filename={tgt},cache.direct=on,aio=io_uring",
        "driver=qcow2,node-name=tgt,file=tf"], "src")
    try:
        fio = fio_load(sock, secs + 5) if load else None
        time.sleep(1 if load else 0)
        t0 = time.monotonic()
        r = q.send({"execute": "blockdev-mirror",
                    "arguments": {"job-id": "m", "device": "src", "target": "tgt", "sync": "full",
                                  "speed": speed}})
        if "error" in r:
            sys.exit(f"blockdev-mirror: {r}")
        ready = None
        while time.monotonic() - t0 < secs:
            jobs = q.send({"execute": "query-block-jobs"})["return"]
            if jobs and jobs[0].get("ready"):
                ready = time.monotonic() - t0
                break
            time.sleep(0.05)
        iops = fio_iops(fio) if fio else None
        q.send({"execute": "block-job-cancel", "arguments": {"device": "m", "force": True}})
        return ready, iops
    finally:
        p.terminate()
        p.wait()
        os.remove(tgt)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="2G")
    ap.add_argument("--load-secs", type=int, default=60)
    ap.add_argument("--work", default="/var/tmp")
    ap.add_argument("--speed", type=int, default=0, help="bytes/s, 0: unlimited")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="appliance-mirror.", dir=a.work)
    try:
        size = int(sh("numfmt", "--from=iec", a.size).stdout)
        raw, src = os.path.join(work, "src.raw"), os.path.join(work, "src.qcow2")
        with open(raw, "wb") as f:
            f.write(os.urandom(size))
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, src)
        os.remove(raw)
        sh("sync")
        results = {}
        for rnd in range(a.rounds):
            order = ["appliance", "qsd"] if rnd % 2 == 0 else ["qsd", "appliance"]
            for load in (False, True):
                for who in order:
                    if who == "appliance":
                        ready, iops = run_appliance(work, src, load, a.load_secs, a.speed)
                    else:
                        ready, iops = run_qsd(work, src, size, load, a.load_secs, a.speed)
                    key = (who, load)
                    results.setdefault(key, []).append((ready, iops))
                    rate = f"{size / ready / 2**20:.0f} MiB/s" if ready else "not ready"
                    print(f"round {rnd + 1} {who:9} {'load' if load else 'idle':4} "
                          f"ready {ready if ready is None else round(ready, 2)} s ({rate}) "
                          f"fio {iops if iops is None else round(iops)} IOPS", flush=True)
        print(f"\n| server | load | time to READY s (median, range) | copy MiB/s | fio IOPS meanwhile | ready in {a.load_secs} s |")
        print("|---|---|---:|---:|---:|---:|")
        for (who, load), rs in sorted(results.items()):
            ts = [r for r, _ in rs if r is not None]
            med = f"{statistics.median(ts):.2f} ({min(ts):.2f}–{max(ts):.2f})" if ts else "–"
            rate = f"{size / statistics.median(ts) / 2**20:.0f}" if ts else "–"
            io = [i for _, i in rs if i]
            iops = f"{statistics.median(io) / 1000:.1f}k" if io else "–"
            print(f"| {who} | {'fio randwrite 4k QD8' if load else 'idle'} | {med} | {rate} | {iops} | {len(ts)}/{len(rs)} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
