//! Certificates and keys into rustls configurations.
//!
//! Every check here names the file it is about: a missing or unreadable file, PEM with
//! no certificate or no key, a key that does not belong to the certificate, a
//! certificate outside its validity period (checked for our own chain and the CA, so
//! an expired server certificate stops start-up or a reload instead of failing every
//! client later). Peer certificates are verified by rustls (webpki) against the CA.
//!
//! The crypto provider is rustls's `ring`; protocol versions are rustls's safe defaults
//! (TLS 1.2 and 1.3).

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use config::TlsFiles;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Why credentials could not be loaded; the message names the file.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct CredsError {
    pub file: String,
    pub reason: String,
}

fn fail(file: &Path, reason: impl Into<String>) -> CredsError {
    CredsError { file: file.display().to_string(), reason: reason.into() }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side of `[nbd.tls]`: our chain and key, and (with `ca`) a verifier that
/// requires a client certificate signed by that CA.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, CredsError> {
    let chain = load_chain(&files.cert)?;
    let key = load_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(&files.cert, e.to_string()))?;
    let builder = match &files.ca {
        Some(ca) => {
            let roots = Arc::new(load_roots(ca)?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| fail(ca, format!("cannot verify clients with it: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| fail(&files.key, format!("does not go with {}: {e}", files.cert.display())))?;
    Ok(Arc::new(config))
}

/// The client side of `[nbd.client_tls]`: trust in `ca`, our certificate for servers
/// that ask for one.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, CredsError> {
    let Some(ca) = &files.ca else {
        return Err(fail(&files.cert, "a TLS client needs `ca` to verify servers with"));
    };
    let roots = load_roots(ca)?;
    let chain = load_chain(&files.cert)?;
    let key = load_key(&files.key)?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(&files.cert, e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| fail(&files.key, format!("does not go with {}: {e}", files.cert.display())))?;
    Ok(Arc::new(config))
}

/// The name a client checks the server's certificate against: the host of the URI,
/// `localhost` for a unix socket (as libnbd does).
pub fn server_name(host: Option<&str>) -> Result<ServerName<'static>, String> {
    let host = host.unwrap_or("localhost");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| format!("`{host}`: {e}"))
}

fn read(file: &Path) -> Result<Vec<u8>, CredsError> {
    std::fs::read(file).map_err(|e| fail(file, format!("cannot read: {e}")))
}

/// A certificate chain, leaf first, each within its validity period.
fn load_chain(file: &Path) -> Result<Vec<CertificateDer<'static>>, CredsError> {
    let pem = read(file)?;
    let mut chain = Vec::new();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| fail(file, format!("not a PEM certificate: {e}")))?;
        check_validity(file, c.as_ref())?;
        chain.push(c);
    }
    if chain.is_empty() {
        return Err(fail(file, "holds no certificate (PEM `BEGIN CERTIFICATE`)"));
    }
    Ok(chain)
}

fn load_key(file: &Path) -> Result<PrivateKeyDer<'static>, CredsError> {
    let pem = read(file)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| fail(file, format!("holds no usable private key: {e}")))
}

fn load_roots(file: &Path) -> Result<RootCertStore, CredsError> {
    let mut roots = RootCertStore::empty();
    for c in load_chain(file)? {
        roots.add(c).map_err(|e| fail(file, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// Refuses a certificate that has expired or is not valid yet, saying when.
fn check_validity(file: &Path, der: &[u8]) -> Result<(), CredsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| fail(file, format!("not an X.509 certificate: {e}")))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let v = cert.validity();
    let subject = cert.subject().to_string();
    if now > v.not_after.timestamp() {
        return Err(fail(file, format!("certificate `{subject}` expired on {}", v.not_after)));
    }
    if now < v.not_before.timestamp() {
        return Err(fail(
            file,
            format!("certificate `{subject}` is not valid before {}", v.not_before),
        ));
    }
    Ok(())
}

/// The subject common name of a DER certificate (the first, if several).
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}
