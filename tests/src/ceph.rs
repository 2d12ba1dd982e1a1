//! A single-node Ceph cluster for a test (tests/ceph/cluster.sh): one monitor and one
//! OSD (BlueStore on a sparse file) on ports of its own, under a temporary directory,
//! stopped when dropped. About 10 s to start, ~300 MiB of RAM while it runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{free_port, require_tool, run, stdout, workspace};

pub struct Cluster {
    pub dir: tempfile::TempDir,
    stopped: bool,
}

fn script() -> PathBuf {
    workspace().join("tests/ceph/cluster.sh")
}

impl Cluster {
    /// Starts a cluster with pool `rbd` and a `client.appliance` key limited to it.
    pub fn start() -> Cluster {
        for (tool, pkg) in [
            ("ceph-mon", "ceph-mon"),
            ("ceph-osd", "ceph-osd"),
            ("rbd", "ceph-common"),
            ("monmaptool", "ceph-base"),
        ] {
            require_tool(tool, pkg);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        // The monitor listens on PORT (msgr2) and PORT+1 (msgr1).
        let port = loop {
            let p = free_port();
            if p < 65000 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
                break p;
            }
        };
        let c = Cluster { dir, stopped: false };
        run(Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(c.dir.path())
            .arg(port.to_string()));
        c
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("ceph.conf")
    }

    /// The keyring of `client.appliance`.
    pub fn keyring(&self) -> PathBuf {
        self.dir.path().join("appliance.keyring")
    }

    /// `rbd ARGS` as client.admin; panics on failure.
    pub fn rbd(&self, args: &[&str]) -> String {
        stdout(&run(Command::new("rbd").arg("-c").arg(self.conf()).args(args)))
    }

    /// QEMU's name of `image` in pool `rbd`, as client.appliance.
    pub fn qemu_name(&self, image: &str) -> String {
        format!(
            "rbd:rbd/{image}:conf={}:id=appliance:keyring={}",
            self.conf().display(),
            self.keyring().display()
        )
    }

    /// A `[[disk]]` table serving `image` (raw unless `extra` says), through
    /// client.appliance, with requests bounded by `timeout` seconds.
    pub fn disk_toml(&self, name: &str, image: &str, timeout: u32, extra: &str) -> String {
        format!(
            "[[disk]]\nname = \"{name}\"\ndriver = \"rbd\"\npath = \"rbd:rbd/{image}\"\n{extra}\n\
             [disk.rbd]\nconf = \"{}\"\nid = \"appliance\"\nkeyring = \"{}\"\ntimeout = {timeout}\n",
            self.conf().display(),
            self.keyring().display()
        )
    }

    /// The image's bytes (`rbd export`).
    pub fn export(&self, image: &str, into: &Path) -> Vec<u8> {
        let _ = std::fs::remove_file(into);
        self.rbd(&["export", &format!("rbd/{image}"), &into.display().to_string()]);
        std::fs::read(into).unwrap()
    }

    /// Bytes the image takes in the cluster (`rbd du`, from its object map).
    pub fn used(&self, image: &str) -> u64 {
        let out = self.rbd(&["du", "--format", "json", &format!("rbd/{image}")]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("rbd du json");
        v["images"][0]["used_size"].as_u64().expect("used_size")
    }

    /// Stops the OSD (its data stays on its file).
    pub fn osd_stop(&self) {
        run(Command::new("bash").arg(script()).arg("osd-stop").arg(self.dir.path()));
    }

    /// Starts the OSD again and waits until it is up.
    pub fn osd_start(&self) {
        run(Command::new("bash").arg(script()).arg("osd-start").arg(self.dir.path()));
    }

    pub fn stop(&mut self) {
        if !self.stopped {
            self.stopped = true;
            let _ = Command::new("bash").arg(script()).arg("stop").arg(self.dir.path()).status();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
