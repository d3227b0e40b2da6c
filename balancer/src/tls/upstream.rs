//! TLS towards upstream instances (`[service.tls]` / `[upstream.service.tls]`).

use std::net::IpAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::l4config::UpstreamTls;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    #[error("{path}: {msg}")]
    Ca { path: String, msg: String },
    #[error("sni {0:?} is not a valid server name")]
    Sni(String),
}

/// How to open TLS to one service's instances.
#[derive(Clone)]
pub struct UpstreamTlsClient {
    connector: TlsConnector,
    sni: Option<ServerName<'static>>,
}

impl UpstreamTlsClient {
    /// `alpn`: protocols offered (`http/1.1` for HTTP services, none for tcp ones).
    pub fn new(cfg: &UpstreamTls, alpn: &[&[u8]]) -> Result<Self, UpstreamTlsError> {
        let provider = super::provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| UpstreamTlsError::Ca {
                path: "rustls".into(),
                msg: e.to_string(),
            })?;
        let mut config = match (&cfg.ca, cfg.verify) {
            (_, false) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
                .with_no_client_auth(),
            (Some(ca), true) => {
                let err = |msg: String| UpstreamTlsError::Ca {
                    path: ca.display().to_string(),
                    msg,
                };
                let pem = std::fs::read(ca).map_err(|e| err(e.to_string()))?;
                let mut roots = RootCertStore::empty();
                for c in rustls_pemfile::certs(&mut &pem[..]) {
                    roots
                        .add(c.map_err(|e| err(e.to_string()))?)
                        .map_err(|e| err(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(err("no CERTIFICATE in the file".into()));
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            (None, true) => {
                return Err(UpstreamTlsError::Ca {
                    path: "(none)".into(),
                    msg: "verify = true needs `ca`".into(),
                });
            }
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let sni = cfg
            .sni
            .as_ref()
            .map(|s| ServerName::try_from(s.clone()).map_err(|_| UpstreamTlsError::Sni(s.clone())))
            .transpose()?;
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            sni,
        })
    }

    /// Handshakes over an established connection to `ip`.
    pub async fn connect(
        &self,
        ip: IpAddr,
        tcp: TcpStream,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let name = self.sni.clone().unwrap_or(ServerName::IpAddress(ip.into()));
        self.connector.connect(name, tcp).await
    }
}

/// `verify = false`: encryption without authentication, as the operator asked.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
