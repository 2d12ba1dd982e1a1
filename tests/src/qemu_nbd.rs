//! qemu-nbd as a peer: started with the given options and waited for until it listens
//! (on a unix socket, or a TCP port of 127.0.0.1).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where qemu-nbd listens.
pub enum Listen<'a> {
    Unix(&'a Path),
    Tcp(u16),
}

/// Starts `qemu-nbd ARGS... FILE` listening on `at`; returns once it accepts
/// connections (the caller kills it).
pub fn start(args: &[&str], file: &Path, at: Listen<'_>) -> Child {
    let mut c = Command::new("qemu-nbd");
    c.args(args);
    match at {
        Listen::Unix(sock) => {
            let _ = std::fs::remove_file(sock);
            c.arg("-k").arg(sock);
        }
        Listen::Tcp(port) => {
            c.args(["-b", "127.0.0.1", "-p", &port.to_string()]);
        }
    }
    let mut child = c
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-nbd (qemu-utils)");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let up = match at {
            Listen::Unix(sock) => std::os::unix::net::UnixStream::connect(sock).is_ok(),
            Listen::Tcp(port) => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        };
        if up {
            return child;
        }
        if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            panic!("qemu-nbd {args:?} {} did not listen", file.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills and reaps a qemu-nbd.
pub fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// qemu-storage-daemon serving one block node (`--blockdev BLOCKDEV`, whose node name
/// must be `r`) as the writable NBD export `r` on a unix socket in `dir`; killed when
/// dropped.
pub struct Qsd {
    child: Child,
    sock: std::path::PathBuf,
}

impl Qsd {
    pub fn start_nbd(dir: &Path, blockdev: &str) -> Qsd {
        let sock = dir.join("qsd-nbd.sock");
        let _ = std::fs::remove_file(&sock);
        let mut child = Command::new("qemu-storage-daemon")
            .args(["--blockdev", blockdev, "--nbd-server"])
            .arg(format!("addr.type=unix,addr.path={}", sock.display()))
            .args(["--export", "type=nbd,id=e,node-name=r,name=r,writable=on"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu-storage-daemon (qemu-system-x86)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
                let _ = child.kill();
                let out = child.wait_with_output().expect("qsd output");
                panic!(
                    "qemu-storage-daemon --blockdev {blockdev} did not listen:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Qsd { child, sock }
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///r?socket={}", self.sock.display())
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
