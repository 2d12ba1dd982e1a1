#!/usr/bin/env python3
"""What an internal snapshot taken on a served disk costs the guest: the appliance's
`snapshot_create` / `snapshot_delete` against qemu-storage-daemon's
`blockdev-snapshot-internal-sync` / `blockdev-snapshot-delete-internal-sync`, on the
same qcow2 image, in alternating rounds.

    python3 bench/snapshot.py [--rounds 3] [--size 16G] [--work /var/tmp]

The image is made with `preallocation=metadata` (every L2 table and refcount block
present, the worst case for a walk of the metadata). While fio writes 4k blocks at
random at QD1 over NBD, the snapshot is created, then deleted, one second apart; the
figures are each call's duration as the client sees it and fio's longest completion
latency over the run (a write held while the disk is quiesced waits for the change).
Servers on CPU 0 (O_DIRECT), fio on CPU 1.
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time

from benchlib import alternate, sh, start_appliance, start_qsd


def fio_start(sock, secs):
    return subprocess.Popen(
        ["taskset", "-c", "1", "fio", "--name=w", "--ioengine=nbd",
         f"--uri=nbd+unix:///d?socket={sock}", "--rw=randwrite", "--bs=4k", "--iodepth=1",
         "--time_based", f"--runtime={secs}", "--size=1G", "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fio_max_ms(p):
    out, err = p.communicate()
    if p.returncode != 0:
        sys.exit(f"fio: {err}")
    return json.loads(out[out.index("{"):])["jobs"][0]["write"]["clat_ns"]["max"] / 1e6


def timed(call):
    """Runs `call` one second after the previous one; its duration in ms."""
    time.sleep(1)
    t = time.monotonic()
    r = call()
    if "error" in r:
        sys.exit(f"snapshot call failed: {r}")
    return (time.monotonic() - t) * 1e3


def appliance(work, img):
    p, sock, rpc = start_appliance(work, f'path = "{img}"\nformat = "qcow2"\n')
    try:
        call = lambda m: lambda: rpc.call(m, {"disk": "d", "name": "s"})
        f = fio_start(sock, 4)
        c = timed(call("snapshot_create"))
        d = timed(call("snapshot_delete"))
        return c, d, fio_max_ms(f)
    finally:
        p.terminate()
        p.wait()


def qsd(work, img):
    p, sock, q = start_qsd(work, [
        f"driver=file,node-name=f,filename={img},cache.direct=on,aio=io_uring",
        "driver=qcow2,node-name=d,file=f"], "d")
    try:
        args = {"device": "d", "name": "s"}
        call = lambda m: lambda: q.send({"execute": m, "arguments": args})
        f = fio_start(sock, 4)
        c = timed(call("blockdev-snapshot-internal-sync"))
        d = timed(call("blockdev-snapshot-delete-internal-sync"))
        return c, d, fio_max_ms(f)
    finally:
        p.terminate()
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="16G")
    ap.add_argument("--work", default="/var/tmp")
    o = ap.parse_args()
    work = tempfile.mkdtemp(prefix="snapshot-bench-", dir=o.work)
    try:
        img = os.path.join(work, "d.qcow2")
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", img,
           o.size)
        res = alternate(["appliance", "qsd"], o.rounds,
                        lambda s: (appliance if s == "appliance" else qsd)(work, img))
        check = sh("qemu-img", "check", img).stdout
        if "No errors" not in check:
            sys.exit(f"qemu-img check: {check}")
        print(f"{o.rounds} alternating rounds, {o.size} qcow2 with preallocated metadata, "
              f"fio 4k randwrite QD1 throughout; median (min..max), ms\n")
        print("| server | create | delete | longest write |")
        print("|---|---:|---:|---:|")
        for s in ("appliance", "qsd"):
            cols = []
            for k in range(3):
                v = [r[k] for r in res[s]]
                cols.append(f"{statistics.median(v):.0f} ({min(v):.0f}..{max(v):.0f})")
            print(f"| {s} | {' | '.join(cols)} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
