#!/usr/bin/env python3
"""What copy-before-write costs the guest during a pull backup: fio 4k random writes at
QD32 over NBD against the appliance and qemu-storage-daemon, each without and with a
point-in-time snapshot in place, in alternating rounds.

    python3 bench/cbw.py [--rounds 3] [--secs 10] [--size 4G] [--work /var/tmp]

With the snapshot, the first write to each 64 KiB chunk first copies the chunk's old
contents to a sparse temporary raw file: the appliance's `export_snapshot` (a
point-in-time NBD export), and in qemu-storage-daemon `blockdev-backup sync=none` into
a raw temporary node (QEMU's fleecing; the export of the temporary node is left out,
as nothing reads it here). Each round starts a fresh server and snapshot, so every chunk
is still to save; fio has no ramp time, so the figure includes the phase where most
writes copy. The disk is a raw file written in full first (no write allocates),
O_DIRECT on both servers; servers on CPU 0, fio on CPU 1.
"""
import argparse, json, os, shutil, statistics, sys, tempfile

from benchlib import alternate, sh, start_appliance, start_qsd


def fio(sock, export, secs, size):
    out = sh("taskset", "-c", "1", "fio", "--name=w", "--ioengine=nbd",
             f"--uri=nbd+unix:///{export}?socket={sock}", "--rw=randwrite", "--bs=4k",
             "--iodepth=32", "--time_based", f"--runtime={secs}", f"--size={size}",
             "--randrepeat=0", "--output-format=json").stdout
    return json.loads(out[out.index("{"):])["jobs"][0]["write"]["iops"]


def appliance(work, img, cbw, secs, size):
    p, sock, rpc = start_appliance(work, f'path = "{img}"\nformat = "raw"\n', idle="busy")
    try:
        if cbw:
            r = rpc.call("export_snapshot", {"disk": "d", "name": "s"})
            if "error" in r:
                sys.exit(f"export_snapshot: {r}")
        return fio(sock, "d", secs, size)
    finally:
        p.terminate()
        p.wait()


def qsd(work, img, cbw, secs, size):
    temp = os.path.join(work, "q-temp.raw")
    with open(temp, "wb") as f:
        f.truncate(os.path.getsize(img))
    p, sock, q = start_qsd(work, [
        f"driver=file,node-name=f,filename={img},cache.direct=on,aio=io_uring",
        "driver=raw,node-name=d,file=f",
        f"driver=file,node-name=tf,filename={temp},cache.direct=on,aio=io_uring",
        "driver=raw,node-name=t,file=tf"], "d")
    try:
        if cbw:
            r = q.send({"execute": "blockdev-backup",
                        "arguments": {"job-id": "j", "device": "d", "target": "t",
                                      "sync": "none"}})
            if "error" in r:
                sys.exit(f"blockdev-backup: {r}")
        return fio(sock, "d", secs, size)
    finally:
        p.terminate()
        p.wait()
        os.unlink(temp)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secs", type=int, default=10)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--work", default="/var/tmp")
    o = ap.parse_args()
    work = tempfile.mkdtemp(prefix="cbw-bench-", dir=o.work)
    try:
        img = os.path.join(work, "d.raw")
        sh("fio", "--name=fill", f"--filename={img}", f"--size={o.size}", "--rw=write",
           "--bs=1M", "--direct=1")
        combos = [(s, c) for s in ("appliance", "qsd") for c in (False, True)]
        res = alternate(combos, o.rounds, lambda c: (appliance if c[0] == "appliance" else qsd)(
            work, img, c[1], o.secs, o.size))
        print(f"{o.rounds} alternating rounds of {o.secs} s, 4k randwrite QD32 over "
              f"{o.size}; median (min..max)\n")
        print("| server | no snapshot | point-in-time snapshot (CBW) | with/without |")
        print("|---|---:|---:|---:|")
        for s in ("appliance", "qsd"):
            a, b = res[(s, False)], res[(s, True)]
            print(f"| {s} | {statistics.median(a):.0f} ({min(a):.0f}..{max(a):.0f}) | "
                  f"{statistics.median(b):.0f} ({min(b):.0f}..{max(b):.0f}) | "
                  f"{statistics.median(b) / statistics.median(a):.3f} |")
        ma = statistics.median(res[("appliance", True)])
        mq = statistics.median(res[("qsd", True)])
        print(f"\nappliance / qsd with the snapshot: {ma / mq:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
