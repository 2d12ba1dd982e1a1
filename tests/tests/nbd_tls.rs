//! NBD over TLS with real clients and a real peer server.
//!
//! - QEMU's clients (`qemu-img info`, `qemu-io`, `qemu-img convert` both ways) and
//!   libnbd's (`nbdinfo`, `nbdcopy` with `nbds://` and `nbds+unix://`) read and write an
//!   export over TLS with client certificates; the data is checked both ways.
//! - Refusals: a plaintext client on the TLS listener (`NBD_REP_ERR_TLS_REQD`), a client
//!   certificate from another CA, a client with no certificate, a client whose identity
//!   is not in an export's allow list (`NBD_REP_ERR_POLICY`, and the export is not
//!   listed to it): each fails, and the log names the client and the reason. An expired
//!   server certificate stops start-up, naming the file.
//! - Reload re-reads the server's certificate: an expired one is refused and the old one
//!   kept; one from another CA is taken, and clients trusting only the first CA fail
//!   until the first certificate is back.
//! - The appliance's own NBD client mirrors a disk to qemu-nbd running with
//!   `--tls-creds ... verify-peer=on`, over TCP, and the copy equals the source.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use appliance_tests::jobs::{qemu_io, start_mirror, wait_state};
use appliance_tests::ops::{control_extra, rpc};
use appliance_tests::tls::{self, Certs};
use appliance_tests::{
    Appliance, Setup, bin, free_port, pattern, require_tool, run, run_unchecked, stdout,
};
use serde_json::json;

const MIB: u64 = 1 << 20;

/// An appliance requiring TLS (client certificates when `ca`), serving a raw 64 MiB
/// disk `d` to anyone with a certificate and `secret` to host-a only.
fn start(certs: &Certs, ca: bool) -> Appliance {
    let allow = if ca { "[disk.nbd]\nallow = [\"CN=host-a\"]\n" } else { "" };
    let setup = Setup {
        nbd: certs.server_toml(ca),
        disks: format!(
            "[[disk]]\nname = \"d\"\npath = \"{{dir}}/d.raw\"\n\
             [[disk]]\nname = \"secret\"\npath = \"{{dir}}/s.raw\"\n{allow}"
        ),
        ..Setup::default()
    };
    Appliance::start(setup, |dir| {
        std::fs::File::create(dir.join("d.raw")).unwrap().set_len(64 * MIB).unwrap();
        std::fs::File::create(dir.join("s.raw")).unwrap().set_len(4 * MIB).unwrap();
    })
}

fn creds_object(certs: &Certs, role: &str) -> String {
    format!("tls-creds-x509,id=t0,endpoint=client,dir={}", certs.dir(role).display())
}

fn image_opts(a: &Appliance, export: &str) -> String {
    format!("driver=nbd,host=127.0.0.1,port={},export={export},tls-creds=t0", a.tcp.port())
}

/// qemu-io with client credentials of `role`.
fn qemu_io_cmd(certs: &Certs, role: &str) -> Command {
    let mut c = Command::new("qemu-io");
    c.args(["--object", &creds_object(certs, role)]);
    c
}

/// `qemu-img <sub>` with client credentials of `role` (options follow the subcommand).
fn qemu_img(sub: &str, certs: &Certs, role: &str) -> Command {
    let mut c = Command::new("qemu-img");
    c.args([sub, "--object", &creds_object(certs, role)]);
    c
}

fn qemu_io_tls(a: &Appliance, certs: &Certs, role: &str, export: &str, cmd: &str) -> String {
    let out =
        run(qemu_io_cmd(certs, role).args(["--image-opts", &image_opts(a, export), "-c", cmd]));
    let s = stdout(&out);
    assert!(!s.contains("fail"), "{cmd}: {s}");
    s
}

fn nbds(a: &Appliance, export: &str, certs: &Certs, role: &str) -> String {
    format!(
        "nbds://127.0.0.1:{}/{export}?tls-certificates={}",
        a.tcp.port(),
        certs.dir(role).display()
    )
}

fn nbds_unix(a: &Appliance, export: &str, certs: &Certs, role: &str) -> String {
    format!(
        "nbds+unix:///{export}?socket={}&tls-certificates={}",
        a.sock.display(),
        certs.dir(role).display()
    )
}

fn tools() {
    require_tool("qemu-img", "qemu-utils");
    require_tool("nbdinfo", "libnbd-bin");
}

#[test]
fn qemu_clients_read_and_write_over_tls() {
    tools();
    let t = tempfile::tempdir().unwrap();
    let certs = tls::make(t.path());
    let a = start(&certs, true);
    qemu_io_tls(&a, &certs, "host-a", "d", "write -P 0x5a 1M 4M");
    let info = run(qemu_img("info", &certs, "host-a").args(["--image-opts", &image_opts(&a, "d")]));
    assert!(stdout(&info).contains("virtual size: 64 MiB"), "{}", stdout(&info));
    // The appliance's image has what qemu-io wrote.
    let img = std::fs::read(a.path("d.raw")).unwrap();
    assert!(img[MIB as usize..5 * MIB as usize].iter().all(|&b| b == 0x5a));
    assert!(img[..MIB as usize].iter().all(|&b| b == 0));
    // Read it all back with qemu-img convert, and write a new image with it.
    let copy = a.path("copy.raw");
    run(qemu_img("convert", &certs, "host-a")
        .args(["--image-opts", &image_opts(&a, "d"), "-O", "raw"])
        .arg(&copy));
    assert_eq!(std::fs::read(&copy).unwrap(), img, "qemu-img convert read what was written");
    let src = a.path("src.raw");
    std::fs::write(&src, pattern(7, 64 * MIB as usize)).unwrap();
    run(qemu_img("convert", &certs, "host-a")
        .args(["-n", "-f", "raw"])
        .arg(&src)
        .args(["--target-image-opts", &image_opts(&a, "d")]));
    qemu_io_tls(&a, &certs, "host-a", "d", "flush");
    assert_eq!(std::fs::read(a.path("d.raw")).unwrap(), std::fs::read(&src).unwrap());
    // host-a may open `secret` too.
    qemu_io_tls(&a, &certs, "host-a", "secret", "read 0 4k");
    let mut a = a;
    assert!(a.stop().success(), "{}", a.logs());
    assert!(a.logs().contains("identity=\"host-a\""), "{}", a.logs());
}

#[test]
fn libnbd_clients_over_tls() {
    tools();
    let t = tempfile::tempdir().unwrap();
    let certs = tls::make(t.path());
    let a = start(&certs, true);
    let size = run(Command::new("nbdinfo").args(["--size", &nbds(&a, "d", &certs, "host-b")]));
    assert_eq!(stdout(&size).trim(), (64 * MIB).to_string());
    let src = a.path("src.raw");
    std::fs::write(&src, pattern(11, 64 * MIB as usize)).unwrap();
    run(Command::new("nbdcopy").arg(&src).arg(nbds_unix(&a, "d", &certs, "host-b")));
    let back = a.path("back.raw");
    run(Command::new("nbdcopy").arg(nbds(&a, "d", &certs, "host-b")).arg(&back));
    let want = std::fs::read(&src).unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), want, "nbdcopy read back what it wrote");
    assert_eq!(std::fs::read(a.path("d.raw")).unwrap(), want);
    // host-b is not in `secret`'s allow list: it is not even listed to it.
    let list = run(Command::new("nbdinfo").args(["--list", &nbds(&a, "", &certs, "host-b")]));
    let list = stdout(&list);
    assert!(list.contains("export=\"d\""), "{list}");
    assert!(!list.contains("secret"), "{list}");
    let list = run(Command::new("nbdinfo").args(["--list", &nbds(&a, "", &certs, "host-a")]));
    assert!(stdout(&list).contains("export=\"secret\""), "{}", stdout(&list));
}

/// Runs `cmd`, which must fail; returns its stderr.
fn fails(cmd: &mut Command) -> String {
    let out = run_unchecked(cmd, Duration::from_secs(60));
    assert!(!out.status.success(), "{cmd:?} should have failed: {}", stdout(&out));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Waits for a log line holding every one of `words` (the refusal is logged as the
/// client goes, which may be a moment after the client tool returns).
fn logged(a: &Appliance, words: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = a.logs();
        if logs.lines().any(|l| words.iter().all(|w| l.contains(w))) {
            return;
        }
        assert!(Instant::now() < deadline, "no log line with {words:?}:\n{logs}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn plaintext_foreign_anonymous_and_unlisted_clients_are_refused() {
    tools();
    let t = tempfile::tempdir().unwrap();
    let certs = tls::make(t.path());
    let a = start(&certs, true);
    std::fs::write(a.path("d.raw"), vec![0x77u8; 64 * MIB as usize]).unwrap();
    // Plaintext, TCP and unix: told TLS is required, served nothing.
    let e = fails(Command::new("qemu-img").args(["info", &a.tcp_uri("d")]));
    assert!(e.to_lowercase().contains("tls"), "{e}");
    logged(&a, &["127.0.0.1:", "NBD_REP_ERR_TLS_REQD", "without TLS"]);
    fails(Command::new("nbdinfo").arg(a.uri("d")));
    logged(&a, &["unix client", "NBD_REP_ERR_TLS_REQD"]);
    // A certificate from another CA.
    fails(qemu_io_cmd(&certs, "rogue").args([
        "--image-opts",
        &image_opts(&a, "d"),
        "-c",
        "read 0 4k",
    ]));
    logged(&a, &["127.0.0.1:", "TLS handshake failed"]);
    // No certificate at all.
    let before = a.logs().matches("TLS handshake failed").count();
    fails(Command::new("nbdinfo").arg(nbds(&a, "d", &certs, "nocert")));
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.logs().matches("TLS handshake failed").count() == before {
        assert!(Instant::now() < deadline, "no refusal logged:\n{}", a.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    // A certificate from the CA, but not one `secret` allows.
    let e =
        fails(qemu_img("info", &certs, "host-b").args(["--image-opts", &image_opts(&a, "secret")]));
    assert!(e.contains("may not open"), "{e}");
    logged(&a, &["identity=\"host-b\"", "export=\"secret\"", "NBD_REP_ERR_POLICY"]);
    fails(Command::new("nbdinfo").arg(nbds(&a, "secret", &certs, "host-b")));
    // Nothing was written through any of them, and the listener still serves.
    assert!(std::fs::read(a.path("d.raw")).unwrap().iter().all(|&b| b == 0x77));
    qemu_io_tls(&a, &certs, "host-a", "d", "read -P 0x77 0 64k");
}

#[test]
fn tls_without_ca_takes_clients_without_certificates() {
    tools();
    let t = tempfile::tempdir().unwrap();
    let certs = tls::make(t.path());
    let a = start(&certs, false);
    let size = run(Command::new("nbdinfo").args(["--size", &nbds(&a, "d", &certs, "nocert")]));
    assert_eq!(stdout(&size).trim(), (64 * MIB).to_string());
    fails(Command::new("nbdinfo").arg(a.uri("d")));
}

/// Runs `appliance serve` on `config`; it must fail to start. Returns its output.
fn refuses_to_start(dir: &Path, config: &str) -> String {
    let cfg = dir.join("appliance.toml");
    std::fs::write(&cfg, config).unwrap();
    let out = run_unchecked(
        Command::new(bin()).args(["serve", "--config"]).arg(&cfg),
        Duration::from_secs(60),
    );
    assert!(!out.status.success(), "the appliance started: {}", stdout(&out));
    format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn bad_server_credentials_stop_start_up_naming_the_file() {
    let t = tempfile::tempdir().unwrap();
    let certs = tls::make(t.path());
    let port = free_port();
    let base = format!("[appliance]\ncores = [0]\n[nbd]\nlisten = [\"tcp:127.0.0.1:{port}\"]\n");
    let expired = certs.dir("expired");
    let cfg = format!(
        "{base}[nbd.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        expired.join("server-cert.pem").display(),
        expired.join("server-key.pem").display()
    );
    let out = refuses_to_start(t.path(), &cfg);
    assert!(out.contains(&expired.join("server-cert.pem").display().to_string()), "{out}");
    assert!(out.contains("expired"), "{out}");
    // A key that is not the certificate's, and a file that is not there.
    let s = certs.dir("server");
    let cfg = format!(
        "{base}[nbd.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        s.join("server-cert.pem").display(),
        certs.dir("host-a").join("client-key.pem").display()
    );
    let out = refuses_to_start(t.path(), &cfg);
    assert!(out.contains("client-key.pem"), "{out}");
    let cfg = format!(
        "{base}[nbd.tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"/nonexistent/ca.pem\"\n",
        s.join("server-cert.pem").display(),
        s.join("server-key.pem").display()
    );
    let out = refuses_to_start(t.path(), &cfg);
    assert!(out.contains("/nonexistent/ca.pem"), "{out}");
}

/// qemu-nbd serving `file` (raw) on 127.0.0.1:`port` with TLS, verifying clients.
fn qemu_nbd_tls(file: &Path, port: u16, certs: &Certs) -> Child {
    let obj = format!(
        "tls-creds-x509,id=s0,endpoint=server,dir={},verify-peer=on",
        certs.dir("server").display()
    );
    let args =
        ["--object", &obj, "--tls-creds", "s0", "-f", "raw", "-t", "-x", "t", "--cache=none"];
    appliance_tests::qemu_nbd::start(&args, file, appliance_tests::qemu_nbd::Listen::Tcp(port))
}

#[test]
fn mirror_to_qemu_nbd_over_tls() {
    require_tool("qemu-nbd", "qemu-utils");
    let t = tempfile::tempdir().unwrap();
    let certs = tls::make(t.path());
    let setup = Setup {
        cores: "[0, 1]",
        disks: "[[disk]]\nname = \"vm\"\npath = \"{dir}/vm.qcow2\"\nformat = \"qcow2\"\n".into(),
        extra: control_extra(None),
        nbd: certs.client_toml("host-a"),
        ..Setup::default()
    };
    let mut a = Appliance::start(setup, |dir| {
        let img = dir.join("vm.qcow2");
        run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&img).arg("128M"));
        qemu_io(&img, &["write -P 0x11 0 8M", "write -z 16M 8M", "write -P 0x22 32M 4M"]);
    });
    let file = a.path("copy.raw");
    std::fs::File::create(&file).unwrap().set_len(128 * MIB).unwrap();
    let port = free_port();
    let mut server = qemu_nbd_tls(&file, port, &certs);
    // Plaintext to a TLS server fails with the server's reason.
    let r = rpc(
        &a,
        "mirror_start",
        json!({"disk": "vm", "target": format!("nbd://127.0.0.1:{port}/t")}),
    );
    assert!(r["error"].is_object(), "{r}");
    let job =
        start_mirror(&a, json!({"disk": "vm", "target": format!("nbds://127.0.0.1:{port}/t")}));
    wait_state(&a, &job, &["ready"], Duration::from_secs(90));
    assert!(rpc(&a, "job_cancel", json!({"job": job}))["result"].is_object());
    wait_state(&a, &job, &["concluded"], Duration::from_secs(60));
    assert!(a.stop().success(), "{}", a.logs());
    let _ = server.kill();
    let _ = server.wait();
    let out = run_unchecked(
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(a.path("vm.qcow2"))
            .arg(&file),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "source and TLS copy differ: {}", stdout(&out));
}

/// Copies `role`'s server certificate and key over the ones in `live`.
fn install_server_cert(certs: &Certs, role: &str, live: &Path) {
    for f in ["server-cert.pem", "server-key.pem"] {
        std::fs::copy(certs.dir(role).join(f), live.join(f)).unwrap();
    }
}

#[test]
fn reload_rereads_the_server_certificate() {
    tools();
    let t = tempfile::tempdir().unwrap();
    let certs = tls::make(t.path());
    let live = t.path().join("live");
    std::fs::create_dir(&live).unwrap();
    std::fs::copy(certs.dir("server").join("ca-cert.pem"), live.join("ca-cert.pem")).unwrap();
    install_server_cert(&certs, "server", &live);
    let setup = Setup {
        nbd: format!(
            "[nbd.tls]\ncert = \"{0}/server-cert.pem\"\nkey = \"{0}/server-key.pem\"\n\
             ca = \"{0}/ca-cert.pem\"\n",
            live.display()
        ),
        disks: "[[disk]]\nname = \"d\"\npath = \"{dir}/d.raw\"\n".into(),
        extra: control_extra(None),
        ..Setup::default()
    };
    let mut a = Appliance::start(setup, |dir| {
        std::fs::File::create(dir.join("d.raw")).unwrap().set_len(4 * MIB).unwrap();
    });
    let read = |a: &Appliance| {
        qemu_io_cmd(&certs, "host-a")
            .args(["--image-opts", &image_opts(a, "d"), "-c", "read 0 4k"])
            .output()
            .unwrap()
    };
    assert!(read(&a).status.success());
    // An expired certificate: the reload says so, naming the file, and keeps the old.
    install_server_cert(&certs, "expired", &live);
    let r = rpc(&a, "reload", json!({}));
    let said = r.to_string();
    assert!(said.contains("expired") && said.contains("server-cert.pem"), "{said}");
    assert!(read(&a).status.success(), "the old certificate is still served");
    // Another CA's certificate is taken: host-a, trusting only the test CA, now fails.
    install_server_cert(&certs, "server-other", &live);
    let r = rpc(&a, "reload", json!({}));
    assert!(r.to_string().contains("re-read"), "{r}");
    assert!(!read(&a).status.success(), "the new certificate is served");
    install_server_cert(&certs, "server", &live);
    assert!(rpc(&a, "reload", json!({})).to_string().contains("re-read"));
    assert!(read(&a).status.success());
    assert!(a.stop().success(), "{}", a.logs());
}
