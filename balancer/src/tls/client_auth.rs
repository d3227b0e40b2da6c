//! Mutual TLS on a listener: the verifier of client certificates, built from the CA file
//! of `[listener.tls.client_auth]`.
//!
//! The CA file is read when the listener's TLS is set up: at start, and on a SIGHUP whose
//! file (or `client_auth` settings) differ from what the running setup was built from
//! (`client_io::SetupConfig` holds the file's bytes). A file that does not load fails the
//! start or the reload, and a failed reload keeps the previous verifier.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

use super::certs::{CertError, invalid, read};
use crate::l4config::ClientAuth;

/// The verifier for `auth`: certificates must chain to one of the CA file's certificates
/// (and carry the client-auth usage when they state usages); `optional` also admits
/// clients that present none.
pub fn verifier(
    auth: &ClientAuth,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, CertError> {
    let path = auth.ca.get_ref();
    let roots = roots(&read(path)?).map_err(|msg| invalid(path, msg))?;
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let builder = if auth.optional {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    builder.build().map_err(|e| invalid(path, e.to_string()))
}

/// The CA certificates of a PEM file; an error names what is wrong with it.
fn roots(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| format!("bad PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no CERTIFICATE in the file".into());
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_without_certificates_is_refused_with_a_reason() {
        assert_eq!(
            roots(b"not pem at all\n").err().as_deref(),
            Some("no CERTIFICATE in the file")
        );
        let garbled = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(roots(garbled).is_err());
    }
}
