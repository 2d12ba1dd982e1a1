#!/usr/bin/env python3
"""What an enabled dirty bitmap costs on the write path: fio 4k random writes at QD32
over NBD against the appliance and against qemu-storage-daemon, each with no bitmap
and with one enabled bitmap (64 KiB granularity), in alternating rounds.

    python3 bench/bitmap.py [--rounds 3] [--secs 15] [--size 1G] [--work /var/tmp] [--mem]

The disk is a raw file (O_DIRECT on both servers, written in full first so no write
allocates); the servers run on CPU 0, fio on CPU 1. Reported: median IOPS (min..max)
per server and setting, and each server's with/without ratio.
"""
import argparse, json, os, shutil, statistics, sys, tempfile

from benchlib import alternate, sh, start_appliance, start_qsd


def fio(sock, secs):
    out = sh("taskset", "-c", "1", "fio", "--name=w", "--ioengine=nbd",
             f"--uri=nbd+unix:///d?socket={sock}", "--rw=randwrite", "--bs=4k",
             "--iodepth=32", "--time_based", f"--runtime={secs}", "--ramp_time=2",
             "--output-format=json").stdout
    return json.loads(out[out.index("{"):])["jobs"][0]["write"]["iops"]


MEM = False


def appliance(work, img, bitmap, secs):
    disk = 'driver = "mem"\nsize = "1GiB"\n' if MEM else f'path = "{img}"\nformat = "raw"\n'
    p, sock, rpc = start_appliance(work, disk, idle="busy")
    try:
        if bitmap:
            r = rpc.call("bitmap_add", {"disk": "d", "name": "b", "granularity": 65536})
            if "error" in r:
                sys.exit(f"bitmap_add: {r}")
        return fio(sock, secs)
    finally:
        p.terminate()
        p.wait()


def qsd(work, img, bitmap, secs):
    p, sock, q = start_qsd(work, [
        f"driver=file,node-name=f,filename={img},cache.direct=on,aio=io_uring",
        "driver=raw,node-name=d,file=f"], "d")
    try:
        if bitmap:
            r = q.send({"execute": "block-dirty-bitmap-add",
                        "arguments": {"node": "d", "name": "b", "granularity": 65536}})
            if "error" in r:
                sys.exit(f"block-dirty-bitmap-add: {r}")
        return fio(sock, secs)
    finally:
        p.terminate()
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secs", type=int, default=15)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--work", default="/var/tmp")
    ap.add_argument("--mem", action="store_true",
                    help="the appliance only, on a RAM disk: the bitmap's cost without the device")
    o = ap.parse_args()
    global MEM
    MEM = o.mem
    work = tempfile.mkdtemp(prefix="bitmap-bench-", dir=o.work)
    try:
        img = os.path.join(work, "d.raw")
        sh("fio", "--name=fill", f"--filename={img}", f"--size={o.size}", "--rw=write",
           "--bs=1M", "--direct=1")
        servers = ("appliance",) if MEM else ("appliance", "qsd")
        combos = [(s, b) for s in servers for b in (False, True)]
        res = alternate(combos, o.rounds, lambda c: (appliance if c[0] == "appliance" else qsd)(
            work, img, c[1], o.secs))
        print(f"{o.rounds} alternating rounds of {o.secs} s, 4k randwrite QD32; median (min..max)\n")
        print("| server | no bitmap | one enabled bitmap | with/without |")
        print("|---|---:|---:|---:|")
        for s in servers:
            a, b = res[(s, False)], res[(s, True)]
            print(f"| {s} | {statistics.median(a):.0f} ({min(a):.0f}..{max(a):.0f}) | "
                  f"{statistics.median(b):.0f} ({min(b):.0f}..{max(b):.0f}) | "
                  f"{statistics.median(b) / statistics.median(a):.3f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
