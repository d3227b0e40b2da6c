//! TLS towards upstream instances (`[service.tls]` / `[upstream.service.tls]`), with an
//! optional client certificate (mutual TLS towards the instances) that follows its files.
//!
//! The client certificate is part of the `ClientConfig`, so a changed certificate means a
//! new config, swapped in for the next handshakes. A new config also brings a new session
//! cache: no session made under the old identity is resumed after the swap (rustls would
//! not resume one across client-certificate resolvers anyway).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use rustls::client::WantsClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, ConfigBuilder, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::certs::{self, CertError};
use super::polled::{Poll, Polled};
use crate::l4config::UpstreamTls;
use crate::l4metrics::L4Metrics;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    #[error("{path}: {msg}")]
    Ca { path: String, msg: String },
    #[error("sni {0:?} is not a valid server name")]
    Sni(String),
    #[error("client certificate: {0}")]
    ClientCert(#[from] CertError),
}

/// How to open TLS to one service's instances.
#[derive(Clone)]
pub struct UpstreamTlsClient {
    /// Replaced by [`ClientCertWatch`] when the client certificate's files change.
    config: Arc<ArcSwap<ClientConfig>>,
    sni: Option<ServerName<'static>>,
}

type Base = ConfigBuilder<ClientConfig, WantsClientCert>;

impl UpstreamTlsClient {
    /// `alpn`: protocols offered (`http/1.1` for HTTP services, none for tcp ones). With a
    /// client certificate configured, also returns what keeps it in step with its files
    /// (to run with [`ClientCertWatch::run`]; a `--check` just drops it).
    pub fn new(
        cfg: &UpstreamTls,
        alpn: &[&[u8]],
    ) -> Result<(Self, Option<ClientCertWatch>), UpstreamTlsError> {
        let provider = super::provider();
        let base = base(cfg, &provider)?;
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let sni = cfg
            .sni
            .as_ref()
            .map(|s| ServerName::try_from(s.clone()).map_err(|_| UpstreamTlsError::Sni(s.clone())))
            .transpose()?;
        let (identity, watch) = match (&cfg.cert, &cfg.key) {
            (Some(cert), Some(key)) => {
                let (files, contents) = Polled::read(vec![cert.clone(), key.clone()])?;
                let pair = certs::key_pair((cert, &contents[0]), (key, &contents[1]), &provider)?;
                let not_after = certs::not_after(cert, &pair)?;
                let watch = ClientCertWatch {
                    config: Weak::new(),
                    base: base.clone(),
                    alpn: alpn.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                    files,
                    not_after,
                    provider,
                };
                (Some(pair), Some(watch))
            }
            // The configuration check refuses one without the other.
            _ => (None, None),
        };
        let config = Arc::new(ArcSwap::from_pointee(finish(base, identity, &alpn)));
        let watch = watch.map(|w| ClientCertWatch {
            config: Arc::downgrade(&config),
            ..w
        });
        Ok((Self { config, sni }, watch))
    }

    /// Handshakes over an established connection to `ip`.
    pub async fn connect(
        &self,
        ip: IpAddr,
        tcp: TcpStream,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let name = self.sni.clone().unwrap_or(ServerName::IpAddress(ip.into()));
        TlsConnector::from(self.config.load_full())
            .connect(name, tcp)
            .await
    }
}

/// Versions and server verification: everything but the client certificate.
fn base(cfg: &UpstreamTls, provider: &Arc<CryptoProvider>) -> Result<Base, UpstreamTlsError> {
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| UpstreamTlsError::Ca {
            path: "rustls".into(),
            msg: e.to_string(),
        })?;
    match (&cfg.ca, cfg.verify) {
        (_, false) => Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider.clone())))),
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
            Ok(builder.with_root_certificates(roots))
        }
        (None, true) => Err(UpstreamTlsError::Ca {
            path: "(none)".into(),
            msg: "verify = true needs `ca`".into(),
        }),
    }
}

fn finish(base: Base, identity: Option<CertifiedKey>, alpn: &[Vec<u8>]) -> ClientConfig {
    let mut config = match identity {
        Some(k) => base.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(k))),
        None => base.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.to_vec();
    config
}

/// Keeps a service's client certificate in step with its files, as listeners' certificates
/// are: polled every [`certs::POLL`]; a pair that fails to load (missing, bad PEM, a key
/// caught between writes that does not fit) keeps the previous one, logged and counted once
/// per content change. Ends once the service's options are dropped (a reload replaced
/// them and no connection holds them).
pub struct ClientCertWatch {
    config: Weak<ArcSwap<ClientConfig>>,
    base: Base,
    alpn: Vec<Vec<u8>>,
    cert: PathBuf,
    key: PathBuf,
    files: Polled,
    not_after: i64,
    provider: Arc<CryptoProvider>,
}

impl ClientCertWatch {
    /// Polls until the options it belongs to are gone, and publishes the certificate's
    /// expiry (see [`crate::l4metrics::UpstreamCertExpiry`]).
    pub async fn run(mut self, service: String, metrics: Arc<L4Metrics>) {
        let id = metrics.upstream_tls_expiry.watch_id();
        let mut tick = tokio::time::interval(certs::POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(config) = self.config.upgrade() else {
                metrics
                    .upstream_tls_expiry
                    .end(&service, id, certs::unix_now());
                return;
            };
            self.poll(&config, &service, &metrics);
            metrics
                .upstream_tls_expiry
                .set(&service, id, self.not_after, certs::unix_now());
        }
    }

    fn poll(&mut self, config: &ArcSwap<ClientConfig>, service: &str, metrics: &L4Metrics) {
        let (cert, key) = (self.cert.as_path(), self.key.as_path());
        // A failure is reported once per change of the files (`Polled`).
        let outcome = match self.files.poll() {
            Poll::Same => None,
            Poll::Changed(c) => Some(
                certs::key_pair((cert, &c[0]), (key, &c[1]), &self.provider)
                    .and_then(|pair| Ok((certs::not_after(cert, &pair)?, pair))),
            ),
            Poll::Unreadable(e) => Some(Err(e)),
        };
        match outcome {
            None => {}
            Some(Ok((not_after, pair))) => {
                config.store(Arc::new(finish(self.base.clone(), Some(pair), &self.alpn)));
                self.not_after = not_after;
                tracing::info!(%service, cert = %cert.display(), "upstream client certificate reloaded");
                metrics
                    .upstream_tls_reloads
                    .with_label_values(&[service, "ok"])
                    .inc();
            }
            Some(Err(e)) => {
                tracing::error!(%service, error = %e,
                    "upstream client certificate reload failed; keeping the previous one");
                metrics
                    .upstream_tls_reloads
                    .with_label_values(&[service, "error"])
                    .inc();
            }
        }
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
