//! Mutual TLS on a listener: the verifier of client certificates, built from the CA file
//! (and the optional CRL file) of `[listener.tls.client_auth]`.
//!
//! The files are read when the listener's TLS is set up: at start, and on a SIGHUP whose
//! files (or `client_auth` settings) differ from what the running setup was built from
//! (`client_io::SetupConfig` holds the files' bytes). A file that does not load fails the
//! start or the reload, and a failed reload keeps the previous verifier.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateRevocationListDer;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

use super::certs::{CertError, invalid, read};
use crate::l4config::ClientAuth;

/// A client-certificate verifier and what the operator is told about its CRLs.
pub struct Verifier {
    pub verifier: Arc<dyn ClientCertVerifier>,
    /// Unix time of the earliest `nextUpdate` of the CRL file (`None`: no CRL file, or
    /// no CRL in it states one).
    pub crl_next_update: Option<i64>,
}

/// The verifier for `auth`: certificates must chain to one of the CA file's certificates
/// (and carry the client-auth usage when they state usages); `optional` also admits
/// clients that present none.
pub fn verifier(auth: &ClientAuth, provider: &Arc<CryptoProvider>) -> Result<Verifier, CertError> {
    let path = auth.ca.get_ref();
    let roots = roots(&read(path)?).map_err(|msg| invalid(path, msg))?;
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let mut crl_next_update = None;
    if let Some(crl) = &auth.crl {
        let list = crls(&read(crl)?).map_err(|msg| invalid(crl, msg))?;
        crl_next_update = next_update(crl, &list);
        // A CRL past its nextUpdate no longer says which certificates are revoked, so a
        // chain it covers is refused, as OpenSSL (HAProxy, nginx) and BoringSSL (Envoy)
        // refuse it; rustls would otherwise go on trusting a stale list.
        builder = builder.with_crls(list).enforce_revocation_expiration();
    }
    let builder = if auth.optional {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    let verifier = builder.build().map_err(|e| {
        // A CRL is parsed here: the error names its file.
        let file = match (&e, &auth.crl) {
            (rustls::server::VerifierBuilderError::InvalidCrl(_), Some(crl)) => crl,
            _ => path,
        };
        invalid(file, e.to_string())
    })?;
    Ok(Verifier {
        verifier,
        crl_next_update,
    })
}

/// A distinguished name as RFC 4514 writes it: last RDN first, `,` between RDNs, `+`
/// inside one, special characters escaped (so `O=Acme\, Inc.` stays one attribute).
/// `None` when a value is not a string.
fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> Option<String> {
    use x509_parser::objects::{oid_registry, oid2abbrev};
    let rdns: Vec<_> = name.iter_rdn().collect();
    let mut out = String::new();
    for (i, rdn) in rdns.iter().rev().enumerate() {
        for (j, atv) in rdn.iter().enumerate() {
            out.push_str(match (i, j) {
                (0, 0) => "",
                (_, 0) => ",",
                _ => "+",
            });
            match oid2abbrev(atv.attr_type(), oid_registry()) {
                Ok(abbrev) => out.push_str(abbrev),
                Err(_) => out.push_str(&atv.attr_type().to_id_string()),
            }
            out.push('=');
            let value = atv.as_str().ok()?;
            let last = value.chars().count().saturating_sub(1);
            for (k, ch) in value.chars().enumerate() {
                let special = matches!(ch, '"' | '+' | ',' | ';' | '<' | '>' | '\\')
                    || (k == 0 && matches!(ch, ' ' | '#'))
                    || (k == last && ch == ' ');
                if special {
                    out.push('\\');
                }
                out.push(ch);
            }
        }
    }
    Some(out)
}

/// The CRLs of a PEM file. With CRLs, rustls checks every certificate of a client's chain
/// (as Envoy does by default): a CA without a CRL here makes its clients' status unknown,
/// and refused.
fn crls(pem: &[u8]) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let crls = rustls_pemfile::crls(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM: {e}"))?;
    if crls.is_empty() {
        return Err("no X509 CRL in the file".into());
    }
    Ok(crls)
}

/// The earliest `nextUpdate` of the CRLs just read from `path` (Unix time). One already
/// past is said in the log: every client whose chain it covers is refused until a fresh
/// list is read (on a SIGHUP).
fn next_update(
    path: &std::path::Path,
    list: &[CertificateRevocationListDer<'static>],
) -> Option<i64> {
    let now = x509_parser::time::ASN1Time::now();
    let mut earliest = None;
    for der in list {
        let Ok((_, crl)) = x509_parser::parse_x509_crl(der) else {
            continue; // the verifier's builder reports a CRL it cannot parse
        };
        let Some(next) = crl.next_update() else {
            continue;
        };
        if next < now {
            tracing::warn!(
                file = %path.display(),
                issuer = %crl.issuer(),
                next_update = %next,
                "CRL expired: clients whose chain it covers are refused until a fresh one is read"
            );
        }
        let at = next.timestamp();
        earliest = Some(earliest.map_or(at, |e: i64| e.min(at)));
    }
    earliest
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
/// Envoy's format: `Hash=<SHA-256 of the DER, hex>;Subject="<DN, RFC 4514>"`. The subject
/// is left out when it is not plain ASCII (a header value cannot carry it as is) or not
/// text; the hash alone still identifies the certificate.
pub fn forwarded_client_cert(der: &[u8]) -> http::HeaderValue {
    use sha2::Digest as _;
    let hash = hex::encode(sha2::Sha256::digest(der));
    let subject = x509_parser::parse_x509_certificate(der)
        .ok()
        .and_then(|(_, c)| rfc4514(c.subject()))
        .filter(|s| s.bytes().all(|b| (b' '..=b'~').contains(&b)));
    let value = match subject {
        // Quoted, `"` escaped, as Envoy writes it.
        Some(s) => format!("Hash={hash};Subject=\"{}\"", s.replace('"', "\\\"")),
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

    /// Subject `/O=Acme, Inc./OU=a+b/CN=alice "A"`; `openssl x509 -nameopt RFC2253`
    /// prints it as `CN=alice \"A\",OU=a\+b,O=Acme\, Inc.`.
    const ALICE: &str = "-----BEGIN CERTIFICATE-----\n\
MIIBxjCCAWugAwIBAgIUbSXkUt3r1XRAD+YmW8Gx5KYo3y0wCgYIKoZIzj0EAwIw\n\
NzETMBEGA1UECgwKQWNtZSwgSW5jLjEMMAoGA1UECwwDYStiMRIwEAYDVQQDDAlh\n\
bGljZSAiQSIwIBcNMjYxMTIyMTI1ODE1WhgPMjEyNjEwMjkxMjU4MTVaMDcxEzAR\n\
BgNVBAoMCkFjbWUsIEluYy4xDDAKBgNVBAsMA2ErYjESMBAGA1UEAwwJYWxpY2Ug\n\
IkEiMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEq6wtZ57w4/cE9xl66C4WufXB\n\
DCR0FEzwQYHoYxe2AbrsFezmgUvSWVv25AHBu58NcXKN1Q6bCEw8r+Bm10QPiKNT\n\
MFEwHQYDVR0OBBYEFBAmu4itlB6imo8M1OrZMXNH8zA2MB8GA1UdIwQYMBaAFBAm\n\
u4itlB6imo8M1OrZMXNH8zA2MA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwID\n\
SQAwRgIhAKJ9F0p1DVSKfD/s8ayybxjXGzQ3RZzpEmkEpcF7ItE/AiEAqvI8Wvos\n\
pcuEQMMT3MRLyyWbYOQNflREu5TKHUmKvFU=\n\
-----END CERTIFICATE-----";

    #[test]
    fn the_header_names_the_certificate_by_hash_and_rfc_4514_subject() {
        let der = rustls_pemfile::certs(&mut ALICE.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(
            forwarded_client_cert(&der).to_str().unwrap(),
            "Hash=c2e4f24a0013b2b63abc089c5c8aead013c3d19177820a3b70330aba62ca7e5f;\
             Subject=\"CN=alice \\\\\"A\\\\\",OU=a\\+b,O=Acme\\, Inc.\""
        );
    }

    #[test]
    fn not_a_certificate_still_gets_a_hash_and_no_subject() {
        let v = forwarded_client_cert(b"junk");
        let v = v.to_str().unwrap();
        assert!(v.starts_with("Hash=") && v.len() == 5 + 64, "{v}");
    }
}
