//! LUKS-encrypted qcow2 against QEMU: an image qemu-img encrypted (its key in a file
//! named by `[disk.encryption] key_file`) is served over NBD; what qemu-io wrote reads
//! back, writes through the appliance (partial and whole clusters, zeroes, over two
//! shards) read back through qemu-io with the secret and compare equal to the same
//! writes by qemu-io on a copy; `qemu-img check` is clean; a pattern written never
//! appears in the file's bytes. A wrong key and a missing key are clear errors that
//! never show the key. Encrypted and plain overlays over an encrypted backing file open
//! with the disk's key, and their copy-on-write compares equal with QEMU's.

use std::path::Path;
use std::process::Command;

use appliance_tests::nbd_map::io;
use appliance_tests::ops::{control_extra, rpc_error, rpc_ok};
use appliance_tests::{Appliance, Setup, qemu_img_create_luks, require_tool, run, stdout};
use serde_json::json;

const SECRET: &str = "correct horse";

fn spec(img: &Path) -> String {
    format!("driver=qcow2,file.filename={},encrypt.key-secret=s0", img.display())
}

fn qemu_io(img: &Path, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.args(["--object", &format!("secret,id=s0,data={SECRET}"), "--image-opts"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let text = stdout(&run(c.arg(spec(img))));
    assert!(!text.contains("fail") && !text.contains("error"), "qemu-io {img:?}: {text}");
}

#[test]
fn encrypted_images_are_served_and_stay_encrypted() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    let img = dir.path().join("enc.qcow2");
    qemu_img_create_luks(|| {
        let mut c = Command::new("qemu-img");
        c.args(["create", "-q", "-f", "qcow2", "--object"])
            .arg(format!("secret,id=s0,data={SECRET}"))
            .args(["-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10"])
            .arg(&img)
            .arg("64M");
        c
    });
    qemu_io(&img, &["write -P 0x61 0 100k".into(), "write -P 0x62 1M 64k".into()]);
    std::fs::write(dir.path().join("key"), SECRET).unwrap();
    std::fs::write(dir.path().join("wrong"), "incorrect horse").unwrap();
    std::fs::copy(&img, theirs.path().join("enc.qcow2")).unwrap();
    let disks = "[[disk]]\nname = \"enc\"\npath = \"{dir}/enc.qcow2\"\nformat = \"qcow2\"\n\
                 [disk.encryption]\nkey_file = \"{dir}/key\"\n";
    let setup = Setup {
        cores: "[0, 1]",
        disks: disks.into(),
        extra: control_extra(None),
        ..Setup::default()
    };
    let mut a = Appliance::start_in(dir, setup);
    io(&a, "enc", &["read -P 0x61 0 100k", "read -P 0x62 1M 64k", "read -P 0 2M 1M"]);
    let script = [
        "write -P 0x71 4096 8192",
        "write -P 0x73 32M 3M",
        "write -P 0x74 1M 512",
        "write -z 40M 1M",
        "write -P 0x75 63M 1M",
    ];
    let script = script.to_vec();
    io(&a, "enc", &script);
    io(&a, "enc", &["read -P 0x73 32M 3M", "read -P 0x74 1M 512", "read -P 0x62 1049088 65024"]);
    qemu_io(
        &theirs.path().join("enc.qcow2"),
        &script.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    );
    // An encrypted disk grows while served; the new area is encrypted like the rest.
    rpc_ok(&a, "disk_resize", json!({"disk": "enc", "size": "128MiB"}));
    io(&a, "enc", &["write -P 0x76 100M 1M", "read -P 0x76 100M 1M", "read -P 0x73 32M 3M"]);
    let q = theirs.path().join("enc.qcow2");
    let secret = format!("secret,id=s0,data={SECRET}");
    run(Command::new("qemu-img").args([
        "resize",
        "-q",
        "--object",
        &secret,
        "--image-opts",
        &spec(&q),
        "128M",
    ]));
    qemu_io(&q, &["write -P 0x76 100M 1M".into()]);
    // Wrong and missing keys: refused, naming the problem, never showing the key.
    for (name, key) in [("w", Some("wrong")), ("m", None)] {
        let copy = a.path(&format!("{name}.qcow2"));
        std::fs::copy(theirs.path().join("enc.qcow2"), &copy).unwrap();
        let mut p = json!({"name": name, "path": copy, "format": "qcow2"});
        if let Some(k) = key {
            p["encryption"] = json!({"key_file": a.path(k)});
        }
        let (_, m) = rpc_error(&a, "disk_add", p);
        let want = if key.is_some() { "does not open any LUKS key slot" } else { "key_file" };
        assert!(m.contains(want) && !m.contains("horse"), "{m}");
    }
    assert!(a.stop().success(), "{}", a.logs());
    assert!(!a.logs().contains("horse"), "the key stays out of the logs");
    // Closing an encrypted image (at the resize, at the stop) stores its metadata cleanly.
    assert!(!a.logs().contains(" ERROR "), "{}", a.logs());
    let ours = a.path("enc.qcow2");
    let out = Command::new("qemu-img")
        .args(["compare", "--object", &format!("secret,id=s0,data={SECRET}"), "--image-opts"])
        .arg(spec(&ours))
        .arg(spec(&theirs.path().join("enc.qcow2")))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let out = Command::new("qemu-img")
        .args(["check", "--object", &format!("secret,id=s0,data={SECRET}"), "--image-opts"])
        .arg(spec(&ours))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("No errors"), "{out:?}");
    // The plaintext never reaches the file.
    let bytes = std::fs::read(&ours).unwrap();
    for b in [0x71u8, 0x73, 0x75, 0x76] {
        assert!(!bytes.windows(512).any(|w| w.iter().all(|x| *x == b)), "{b:#x} in plaintext");
    }
}

/// `appliance create -o encrypt.format=luks,encrypt.key-file=...` makes a volume QEMU
/// opens with the same key; served by the appliance, what qemu-io wrote reads back,
/// and `appliance check` agrees with `qemu-img check`. Without a key file, or with
/// another format, create refuses.
#[test]
fn appliance_create_makes_luks_images_qemu_opens() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, SECRET).unwrap();
    let img = dir.path().join("made.qcow2");
    let opts =
        format!("encrypt.format=luks,encrypt.key-file={},encrypt.iter-time=20", key.display());
    run(Command::new(appliance_tests::bin()).args(["create", "-o", &opts]).arg(&img).arg("32M"));
    qemu_io(&img, &["write -P 0x44 1M 2M".into(), "read -P 0 0 1M".into()]);
    let out = Command::new("qemu-img")
        .args(["check", "--object", &format!("secret,id=s0,data={SECRET}"), "--image-opts"])
        .arg(spec(&img))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("No errors"), "{out:?}");
    let ours = stdout(&run(Command::new(appliance_tests::bin()).arg("check").arg(&img)));
    assert!(ours.contains("No errors were found"), "{ours}");
    let info =
        stdout(&run(Command::new(appliance_tests::bin()).args(["info", "--json"]).arg(&img)));
    assert!(info.contains("\"encrypted\": true"), "{info}");
    for bad in ["encrypt.format=luks", "encrypt.format=aes"] {
        let out = Command::new(appliance_tests::bin())
            .args(["create", "-o", bad])
            .arg(dir.path().join("bad.qcow2"))
            .arg("1M")
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && (e.contains("key-file") || e.contains("not luks")), "{e}");
    }
    let disks = "[[disk]]\nname = \"m\"\npath = \"{dir}/made.qcow2\"\nformat = \"qcow2\"\n\
                 [disk.encryption]\nkey_file = \"{dir}/key\"\n";
    let mut a = Appliance::start_in(dir, Setup { disks: disks.into(), ..Setup::default() });
    io(&a, "m", &["read -P 0x44 1M 2M", "write -P 0x45 8M 1M", "read -P 0x45 8M 1M"]);
    assert!(a.stop().success(), "{}", a.logs());
    qemu_io(&a.path("made.qcow2"), &["read -P 0x45 8M 1M".into(), "read -P 0x44 1M 2M".into()]);
}

/// `--image-opts` of an image whose chain (this image and its backing file) is opened
/// with the secret `s0` wherever it is encrypted.
fn chain_spec(img: &Path, top_encrypted: bool) -> String {
    let top = if top_encrypted { ",encrypt.key-secret=s0" } else { "" };
    format!("driver=qcow2,file.filename={}{top},backing.encrypt.key-secret=s0", img.display())
}

#[test]
fn encrypted_backing_files_open_with_the_disks_key() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    let secret = format!("secret,id=s0,data={SECRET}");
    let base = dir.path().join("base.qcow2");
    qemu_img_create_luks(|| {
        let mut c = Command::new("qemu-img");
        c.args(["create", "-q", "-f", "qcow2", "--object", &secret])
            .args(["-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10"])
            .arg(&base)
            .arg("16M");
        c
    });
    qemu_io(&base, &["write -P 0x51 0 16M".into()]);
    // An encrypted overlay and a plain one over the encrypted base (`-u`: qemu-img
    // cannot open the base without its secret here).
    qemu_img_create_luks(|| {
        let mut c = Command::new("qemu-img");
        c.args(["create", "-q", "-u", "-f", "qcow2", "--object", &secret, "-b", "base.qcow2"])
            .args(["-F", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0"])
            .args(["-o", "encrypt.iter-time=10"])
            .arg(dir.path().join("enc.qcow2"))
            .arg("16M");
        c
    });
    run(Command::new("qemu-img")
        .args(["create", "-q", "-u", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"])
        .arg(dir.path().join("plain.qcow2"))
        .arg("16M"));
    for f in ["base.qcow2", "enc.qcow2", "plain.qcow2"] {
        std::fs::copy(dir.path().join(f), theirs.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("key"), SECRET).unwrap();
    let disks = ["enc", "plain"]
        .iter()
        .map(|n| {
            format!(
                "[[disk]]\nname = \"{n}\"\npath = \"{{dir}}/{n}.qcow2\"\nformat = \"qcow2\"\n\
                 [disk.encryption]\nkey_file = \"{{dir}}/key\"\n"
            )
        })
        .collect::<String>();
    let setup = Setup { cores: "[0, 1]", disks, extra: control_extra(None), ..Setup::default() };
    let mut a = Appliance::start_in(dir, setup);
    // Partial clusters copy the base's decrypted bytes into the overlay.
    let script = ["write -P 0x61 1000 3000", "write -P 0x62 5M 64k", "write -z 8M 4096"];
    for n in ["enc", "plain"] {
        io(&a, n, &["read -P 0x51 0 1M"]);
        io(&a, n, &script);
        io(&a, n, &["read -P 0x51 0 1000", "read -P 0x61 1000 3000", "read -P 0x51 4000 61536"]);
    }
    assert!(a.stop().success(), "{}", a.logs());
    for (n, enc) in [("enc", true), ("plain", false)] {
        let ours = chain_spec(&a.path(&format!("{n}.qcow2")), enc);
        let q = chain_spec(&theirs.path().join(format!("{n}.qcow2")), enc);
        let mut c = Command::new("qemu-io");
        c.args(["--object", &secret, "--image-opts", &q]);
        for cmd in script {
            c.args(["-c", cmd]);
        }
        assert!(!stdout(&run(&mut c)).contains("fail"));
        let out = Command::new("qemu-img")
            .args(["compare", "--object", &secret, "--image-opts", &ours, &q])
            .output()
            .unwrap();
        assert!(out.status.success(), "{n}: {}", String::from_utf8_lossy(&out.stdout));
        let out = Command::new("qemu-img")
            .args(["check", "--object", &secret, "--image-opts", &ours])
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("No errors"), "{n}: {out:?}");
    }
    // The encrypted overlay never holds plaintext, not even the base's it copied.
    let bytes = std::fs::read(a.path("enc.qcow2")).unwrap();
    for b in [0x51u8, 0x61, 0x62] {
        assert!(!bytes.windows(512).any(|w| w.iter().all(|x| *x == b)), "{b:#x} in plaintext");
    }
}
