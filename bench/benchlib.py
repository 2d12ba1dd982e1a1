"""Helpers the benchmark scripts share: the appliance binary, commands, waiting for a
unix socket, and a line-oriented JSON client for the control socket and QMP."""
import json, os, socket, subprocess, sys, time

APPLIANCE = os.environ.get("APPLIANCE", "target/release/appliance")


def sh(*a, **kw):
    return subprocess.run(a, check=True, capture_output=True, text=True, **kw)


def wait_sock(path, proc, what):
    for _ in range(400):
        if os.path.exists(path):
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(path)
                s.close()
                return
            except OSError:
                pass
        if proc.poll() is not None:
            sys.exit(f"{what} exited early")
        time.sleep(0.05)
    sys.exit(f"{what} did not listen on {path}")


class Rpc:
    """One JSON object per line: the appliance's control socket and QMP alike."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rw")

    def call(self, method, params):
        """A JSON-RPC call to the appliance's control socket; the reply."""
        return self.send({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})

    def send(self, obj):
        self.f.write(json.dumps(obj) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" not in r:
                return r


def start_appliance(work, disk, idle=None):
    """The appliance on CPU 0 serving disk `d` (`disk`: the rest of its [[disk]] table,
    as TOML lines) over NBD on a unix socket, with a control socket and the idle policy
    `idle` (default: the appliance's). Returns the process, the NBD socket and a
    control client; the caller terminates the process."""
    sock, ctl, cfg = (os.path.join(work, n) for n in ("a.sock", "a-ctl.sock", "a.toml"))
    with open(cfg, "w") as f:
        f.write("[appliance]\ncores = [0]\n" + (f'idle = "{idle}"\n' if idle else "") +
                f'[nbd]\nlisten = ["unix:{sock}"]\n[control]\nsocket = "{ctl}"\n'
                f'[[disk]]\nname = "d"\n{disk}')
    p = subprocess.Popen(["taskset", "-c", "0", APPLIANCE, "serve", "--config", cfg],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_sock(ctl, p, "appliance")
        return p, sock, Rpc(ctl)
    except BaseException:
        p.terminate()
        p.wait()
        raise


def start_qsd(work, blockdevs, node):
    """qemu-storage-daemon on CPU 0 with `blockdevs` (the --blockdev option strings),
    node `node` exported writable over NBD as `d`, and a QMP monitor. Returns the
    process, the NBD socket and a QMP client past its capabilities negotiation; the
    caller terminates the process."""
    sock, qmp = os.path.join(work, "q.sock"), os.path.join(work, "q-qmp.sock")
    args = ["taskset", "-c", "0", "qemu-storage-daemon"]
    for b in blockdevs:
        args += ["--blockdev", b]
    args += ["--nbd-server", f"addr.type=unix,addr.path={sock}",
             "--export", f"type=nbd,id=e,node-name={node},name=d,writable=on",
             "--chardev", f"socket,id=m,path={qmp},server=on,wait=off", "--monitor", "chardev=m"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_sock(qmp, p, "qemu-storage-daemon")
        wait_sock(sock, p, "qemu-storage-daemon")
        q = Rpc(qmp)
        json.loads(q.f.readline())  # greeting
        q.send({"execute": "qmp_capabilities"})
    except BaseException:
        p.terminate()
        p.wait()
        raise
    return p, sock, q


def alternate(combos, rounds, run):
    """Runs `run(combo)` for every combo, `rounds` times, reversing the order every
    other round; the results per combo, in round order."""
    res = {c: [] for c in combos}
    for r in range(rounds):
        for c in (combos if r % 2 == 0 else combos[::-1]):
            res[c].append(run(c))
            v = res[c][-1]
            shown = f"{v:.0f}" if isinstance(v, (int, float)) else v
            print(f"round {r} {c}: {shown}", file=sys.stderr)
    return res
