#!/usr/bin/env python3
"""The cost of NBD over TLS: the appliance against qemu-nbd, each over TCP with and
without TLS (the same x509 certificates, client certificates required), in
alternating rounds.

    python3 bench/tls.py [--rounds 3] [--secs 15] [--size 1G] [--work /var/tmp]

Per server and transport: fio's nbd engine (libnbd; `nbds://` for TLS, run as
nobody so libnbd reads the client certificate from $HOME/.pki/libnbd) runs 4k random reads at QD32 and 64k sequential reads at QD8 against a raw
image in the page cache (written first, so the device is not what is measured). The
servers run on CPU 0, fio on CPU 1. Reported: median IOPS and MB/s over the rounds,
the spread (min..max), and for each server the TLS/plain ratio; the closing figure is
the ratio of the two servers' TLS costs.
"""
import argparse, os, shutil, socket, statistics, subprocess, sys, tempfile, time

from benchlib import APPLIANCE, sh

JOBS = [("4k-randread-qd32", "randread", "4k", 32), ("64k-read-qd8", "read", "64k", 8)]


def openssl(cwd, *args):
    sh("openssl", *args, cwd=cwd)


def make_certs(root):
    """CA, server (127.0.0.1) and client (CN=bench) in QEMU/libnbd directory layout."""
    work = os.path.join(root, "work")
    os.makedirs(work)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl(work, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-subj",
            "/CN=bench-ca", "-days", "2", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    exts = {
        "server": "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        "client": "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
        "extendedKeyUsage=clientAuth\n",
    }
    for kind, ext in exts.items():
        openssl(work, "req", *ec, "-keyout", f"{kind}.key", "-out", f"{kind}.csr", "-subj",
                f"/CN=bench-{kind}")
        with open(os.path.join(work, f"{kind}.ext"), "w") as f:
            f.write(ext)
        openssl(work, "x509", "-req", "-in", f"{kind}.csr", "-CA", "ca.pem", "-CAkey",
                "ca.key", "-CAcreateserial", "-days", "2", "-extfile", f"{kind}.ext",
                "-out", f"{kind}.pem")
        d = os.path.join(root, kind)
        os.makedirs(d)
        shutil.copy(os.path.join(work, "ca.pem"), os.path.join(d, "ca-cert.pem"))
        shutil.copy(os.path.join(work, f"{kind}.pem"), os.path.join(d, f"{kind}-cert.pem"))
        shutil.copy(os.path.join(work, f"{kind}.key"), os.path.join(d, f"{kind}-key.pem"))
    return os.path.join(root, "server"), os.path.join(root, "client")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, proc, what):
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"{what} exited early")
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port}")


def start_appliance(work, image, port, server_dir, tls):
    cfg = os.path.join(work, "a.toml")
    with open(cfg, "w") as f:
        f.write(f'[appliance]\ncores = [0]\nidle = "busy"\n'
                f'[nbd]\nlisten = ["tcp:127.0.0.1:{port}"]\n')
        if tls:
            f.write(f'[nbd.tls]\ncert = "{server_dir}/server-cert.pem"\n'
                    f'key = "{server_dir}/server-key.pem"\nca = "{server_dir}/ca-cert.pem"\n')
        f.write(f'[[disk]]\nname = "d"\npath = "{image}"\nformat = "raw"\ndirect = false\n')
    p = subprocess.Popen(["taskset", "-c", "0", APPLIANCE, "serve", "--config", cfg],
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "a.log"), "w"))
    wait_port(port, p, "appliance")
    return p


def start_qemu_nbd(image, port, server_dir, tls):
    args = ["taskset", "-c", "0", "qemu-nbd", "-f", "raw", "-t", "-x", "d", "-e", "8",
            "--aio=io_uring", "-b", "127.0.0.1", "-p", str(port)]
    if tls:
        args += ["--object", f"tls-creds-x509,id=s0,endpoint=server,dir={server_dir},"
                 "verify-peer=on", "--tls-creds", "s0"]
    p = subprocess.Popen(args + [image], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, p, "qemu-nbd")
    return p


def fio(uri, rw, bs, qd, secs, home):
    # fio's nbd engine refuses `tls-certificates=` in a URI (libnbd's local-file rule),
    # so fio runs as nobody with HOME holding .pki/libnbd, libnbd's default directory.
    user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "env",
            f"HOME={home}"]
    out = sh("taskset", "-c", "1", *user, "fio", "--name=b", "--ioengine=nbd", f"--uri={uri}",
             f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", "--time_based",
             f"--runtime={secs}", "--ramp_time=2", "--output-format=json")
    import json
    r = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]["read"]
    return r["iops"], r["bw_bytes"] / 1e6


def one(server, tls, image, work, dirs, secs):
    port = free_port()
    sdir, cdir = dirs
    if server == "appliance":
        p = start_appliance(work, image, port, sdir, tls)
    else:
        p = start_qemu_nbd(image, port, sdir, tls)
    uri = f"nbds://127.0.0.1:{port}/d" if tls else f"nbd://127.0.0.1:{port}/d"
    home = os.path.join(work, "home")
    try:
        return {name: fio(uri, rw, bs, qd, secs, home) for name, rw, bs, qd in JOBS}
    finally:
        p.terminate()
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secs", type=int, default=15)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--work", default="/var/tmp")
    o = ap.parse_args()
    work = tempfile.mkdtemp(prefix="tls-bench-", dir=o.work)
    try:
        dirs = make_certs(os.path.join(work, "certs"))
        pki = os.path.join(work, "home", ".pki")
        shutil.copytree(dirs[1], os.path.join(pki, "libnbd"))
        for d, _, files in os.walk(work):
            os.chmod(d, 0o755)
            for f in files:
                os.chmod(os.path.join(d, f), 0o644)
        image = os.path.join(work, "d.raw")
        sh("fio", "--name=fill", f"--filename={image}", f"--size={o.size}", "--rw=write",
           "--bs=1M", "--refill_buffers")
        subprocess.run(["cat", image], check=True, stdout=subprocess.DEVNULL)  # page cache
        combos = [(s, t) for s in ("appliance", "qemu-nbd") for t in (False, True)]
        res = {c: [] for c in combos}
        for r in range(o.rounds):
            order = combos if r % 2 == 0 else list(reversed(combos))
            for c in order:
                res[c].append(one(c[0], c[1], image, work, dirs, o.secs))
                print(f"round {r} {c[0]} {'tls' if c[1] else 'plain'}: {res[c][-1]}",
                      file=sys.stderr)
        report(res, o)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(res, o):
    print(f"{o.rounds} alternating rounds of {o.secs} s; median (min..max)\n")
    print("| job | server | plain | TLS | TLS/plain |")
    print("|---|---|---|---|---|")
    ratios = {}
    for name, _, bs, _ in JOBS:
        k = 0 if bs == "4k" else 1
        unit = "IOPS" if k == 0 else "MB/s"
        for s in ("appliance", "qemu-nbd"):
            pl = [x[name][k] for x in res[(s, False)]]
            tl = [x[name][k] for x in res[(s, True)]]
            mp, mt = statistics.median(pl), statistics.median(tl)
            ratios[(name, s)] = mt / mp
            print(f"| {name} | {s} | {mp:.0f} {unit} ({min(pl):.0f}..{max(pl):.0f}) | "
                  f"{mt:.0f} {unit} ({min(tl):.0f}..{max(tl):.0f}) | {mt / mp:.2f} |")
    print()
    for name, _, _, _ in JOBS:
        a, q = ratios[(name, "appliance")], ratios[(name, "qemu-nbd")]
        tl = lambda s: statistics.median(x[name][0] for x in res[(s, True)])
        print(f"- {name}: TLS keeps {a:.2f} of the appliance's plain rate, {q:.2f} of "
              f"qemu-nbd's; with TLS appliance/qemu-nbd = {tl('appliance') / tl('qemu-nbd'):.2f}")


if __name__ == "__main__":
    main()
