//! Certificates for the TLS tests, made with `openssl` in a temporary directory and laid
//! out the way QEMU's and libnbd's x509 credentials want them: one directory per role
//! holding `ca-cert.pem` and `server-cert.pem`/`server-key.pem` or
//! `client-cert.pem`/`client-key.pem`.
//!
//! - `server/`: the appliance's (or qemu-nbd's) certificate from the test CA, for
//!   `127.0.0.1` and `localhost`;
//! - `host-a/`, `host-b/`: client certificates from the test CA (CN=host-a, CN=host-b);
//! - `rogue/`: a client certificate with CN=host-a from another CA; its `ca-cert.pem`
//!   holds both CAs (a QEMU client refuses its own certificate otherwise);
//! - `nocert/`: the test CA only, no client certificate;
//! - `expired/`: a server certificate from the test CA that expired yesterday;
//! - `server-other/`: a server certificate from the other CA.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::run;

/// The credential directories (see the module doc).
pub struct Certs {
    pub root: PathBuf,
}

impl Certs {
    pub fn dir(&self, role: &str) -> PathBuf {
        self.root.join(role)
    }

    /// `[nbd.tls]` with the server certificate; `ca` requires client certificates.
    pub fn server_toml(&self, ca: bool) -> String {
        let d = self.dir("server");
        let mut t = format!(
            "[nbd.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            d.join("server-cert.pem").display(),
            d.join("server-key.pem").display()
        );
        if ca {
            t += &format!("ca = \"{}\"\n", d.join("ca-cert.pem").display());
        }
        t
    }

    /// `[nbd.client_tls]` with the credentials of `role` (a client directory).
    pub fn client_toml(&self, role: &str) -> String {
        let d = self.dir(role);
        format!(
            "[nbd.client_tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
            d.join("client-cert.pem").display(),
            d.join("client-key.pem").display(),
            d.join("ca-cert.pem").display()
        )
    }
}

fn openssl(args: &[&str], dir: &Path) {
    run(Command::new("openssl").args(args).current_dir(dir));
}

/// A key and a CSR for `cn` in `dir` (`NAME.key`, `NAME.csr`).
fn key_and_csr(dir: &Path, name: &str, cn: &str) {
    openssl(
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ],
        dir,
    );
}

/// Signs `NAME.csr` with CA `ca` into `NAME.pem`, valid for `days` (negative: expired).
fn sign(dir: &Path, name: &str, ca: &str, days: i32, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            &days.to_string(),
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ],
        dir,
    );
}

fn ca(dir: &Path, name: &str) {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-subj",
            &format!("/CN={name}"),
            "-days",
            "30",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        dir,
    );
}

const SERVER_EXT: &str = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
    extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n";
const CLIENT_EXT: &str =
    "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n";

/// Lays out a credential directory from files in `work`.
fn role(root: &Path, work: &Path, role: &str, ca_files: &[&str], kind: &str, name: &str) {
    let d = root.join(role);
    std::fs::create_dir_all(&d).unwrap();
    let mut cas = String::new();
    for c in ca_files {
        cas += &std::fs::read_to_string(work.join(format!("{c}.pem"))).unwrap();
    }
    std::fs::write(d.join("ca-cert.pem"), cas).unwrap();
    if !kind.is_empty() {
        std::fs::copy(work.join(format!("{name}.pem")), d.join(format!("{kind}-cert.pem")))
            .unwrap();
        std::fs::copy(work.join(format!("{name}.key")), d.join(format!("{kind}-key.pem"))).unwrap();
    }
}

/// Makes every credential directory under `root`.
pub fn make(root: &Path) -> Certs {
    crate::require_tool("openssl", "openssl");
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    ca(&work, "test-ca");
    ca(&work, "other-ca");
    for (name, cn, signer, days, ext) in [
        ("server", "appliance", "test-ca", 30, SERVER_EXT),
        ("server-other", "appliance", "other-ca", 30, SERVER_EXT),
        ("expired", "appliance", "test-ca", -1, SERVER_EXT),
        ("host-a", "host-a", "test-ca", 30, CLIENT_EXT),
        ("host-b", "host-b", "test-ca", 30, CLIENT_EXT),
        ("rogue", "host-a", "other-ca", 30, CLIENT_EXT),
    ] {
        key_and_csr(&work, name, cn);
        sign(&work, name, signer, days, ext);
    }
    role(root, &work, "server", &["test-ca"], "server", "server");
    role(root, &work, "expired", &["test-ca"], "server", "expired");
    role(root, &work, "server-other", &["other-ca"], "server", "server-other");
    role(root, &work, "host-a", &["test-ca"], "client", "host-a");
    role(root, &work, "host-b", &["test-ca"], "client", "host-b");
    role(root, &work, "rogue", &["test-ca", "other-ca"], "client", "rogue");
    role(root, &work, "nocert", &["test-ca"], "", "");
    Certs { root: root.to_path_buf() }
}
