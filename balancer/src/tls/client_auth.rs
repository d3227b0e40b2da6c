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

/// The `X-Forwarded-Client-Cert` value for a verified client certificate (DER), in
/// Envoy's format: `Hash=<SHA-256 of the DER, hex>;Subject="<DN>"`. The subject is left
/// out when it is not plain ASCII (a header value cannot carry it as is); the hash alone
/// still identifies the certificate.
pub fn forwarded_client_cert(der: &[u8]) -> http::HeaderValue {
    use sha2::Digest as _;
    let hash = hex::encode(sha2::Sha256::digest(der));
    let subject = x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| c.subject().to_string())
        .filter(|s| s.bytes().all(|b| (b' '..=b'~').contains(&b)));
    let value = match subject {
        Some(s) => format!(
            "Hash={hash};Subject=\"{}\"",
            s.replace('\\', "\\\\").replace('"', "\\\"")
        ),
        None => format!("Hash={hash}"),
    };
    // Visible ASCII only (hex, and a subject filtered above): always a valid value.
    http::HeaderValue::try_from(value).unwrap_or(http::HeaderValue::from_static("Hash=unknown"))
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

    #[test]
    fn not_a_certificate_still_gets_a_hash_and_no_subject() {
        let v = forwarded_client_cert(b"junk");
        let v = v.to_str().unwrap();
        assert!(v.starts_with("Hash=") && v.len() == 5 + 64, "{v}");
    }
}
