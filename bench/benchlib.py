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

    def send(self, obj):
        self.f.write(json.dumps(obj) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" not in r:
                return r
