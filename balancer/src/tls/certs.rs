//! Certificates of a TLS listener: loaded from PEM files, chosen by SNI, reloaded when the
//! files change.
//!
//! The resolver reads one `ArcSwap<CertSet>` per handshake; the reload task builds a new
//! set off the handshake path and swaps it in. A file that fails to load (missing, bad
//! PEM, key not matching the certificate: e.g. caught between writing the certificate and
//! the key) keeps the previous certificate, logs and counts an error, and is retried on
//! the next poll.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::polled::{Poll, Polled};
use crate::l4config::CertConfig;
use crate::l4metrics::L4Metrics;

/// How often certificate files are compared with what is loaded.
pub const POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The io error is part of the message, not a `source`: shown once, also where the
    /// error is printed with its chain (`{:#}`).
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

/// One loaded certificate.
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    pub names: Vec<String>,
    /// Unix time of `notAfter`.
    pub not_after: i64,
}

/// A certificate's files, in the order [`build`] takes their contents: chain, key and,
/// if configured, the OCSP response to staple.
fn paths(cfg: &CertConfig) -> Vec<PathBuf> {
    let mut p = vec![cfg.cert.get_ref().clone(), cfg.key.clone()];
    p.extend(cfg.ocsp.clone());
    p
}

pub(super) fn invalid(path: &Path, msg: impl Into<String>) -> CertError {
    CertError::Invalid {
        path: path.to_owned(),
        msg: msg.into(),
    }
}

pub(super) fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|error| CertError::Read {
        path: path.to_owned(),
        error,
    })
}

/// Loads one `[[listener.tls.certificate]]`.
pub fn load(cfg: &CertConfig, provider: &CryptoProvider) -> Result<Loaded, CertError> {
    Ok(load_polled(cfg, provider)?.0)
}

/// [`load`], with the watch of its files for a [`Reloader`].
pub fn load_polled(
    cfg: &CertConfig,
    provider: &CryptoProvider,
) -> Result<(Loaded, Polled), CertError> {
    let (polled, contents) = Polled::read(paths(cfg))?;
    Ok((build(cfg, provider, &contents)?, polled))
}

/// A certificate chain and its private key from the PEM contents of their files (named in
/// errors), checked to fit each other.
pub(super) fn key_pair(
    (cert_path, cert): (&Path, &[u8]),
    (key_path, key): (&Path, &[u8]),
    provider: &CryptoProvider,
) -> Result<CertifiedKey, CertError> {
    let chain: Vec<_> = rustls_pemfile::certs(&mut &cert[..])
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(cert_path, format!("bad PEM: {e}")))?;
    if chain.is_empty() {
        return Err(invalid(cert_path, "no CERTIFICATE in the file"));
    }
    let key = rustls_pemfile::private_key(&mut &key[..])
        .map_err(|e| invalid(key_path, format!("bad PEM: {e}")))?
        .ok_or_else(|| invalid(key_path, "no PRIVATE KEY in the file"))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        invalid(
            key_path,
            format!("key does not fit {}: {e}", cert_path.display()),
        )
    })
}

/// Unix time of the leaf certificate's `notAfter`.
pub(super) fn not_after(cert_path: &Path, key: &CertifiedKey) -> Result<i64, CertError> {
    let (_, x509) = x509_parser::parse_x509_certificate(&key.cert[0])
        .map_err(|e| invalid(cert_path, format!("bad certificate: {e}")))?;
    Ok(x509.validity().not_after.timestamp())
}

/// The time now, in Unix seconds.
pub(super) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A certificate from its files' contents, in the order of [`paths`].
fn build(
    cfg: &CertConfig,
    provider: &CryptoProvider,
    contents: &[Vec<u8>],
) -> Result<Loaded, CertError> {
    let cert_path = cfg.cert.get_ref();
    let mut key = key_pair(
        (cert_path, &contents[0]),
        (&cfg.key, &contents[1]),
        provider,
    )?;
    if let (Some(ocsp), Some(path)) = (contents.get(2), &cfg.ocsp) {
        // A DER OCSPResponse is a SEQUENCE; anything else would be stapled as garbage.
        if ocsp.first() != Some(&0x30) {
            return Err(invalid(path, "not a DER OCSP response"));
        }
        key.ocsp = Some(ocsp.clone());
    }
    let (_, x509) = x509_parser::parse_x509_certificate(&key.cert[0])
        .map_err(|e| invalid(cert_path, format!("bad certificate: {e}")))?;
    let not_after = x509.validity().not_after.timestamp();
    let mut names: Vec<String> = cfg.names.iter().map(|n| n.to_ascii_lowercase()).collect();
    if names.is_empty() {
        if let Ok(Some(san)) = x509.subject_alternative_name() {
            for n in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                    names.push(d.to_ascii_lowercase());
                }
            }
        }
        if names.is_empty() {
            names.extend(
                x509.subject()
                    .iter_common_name()
                    .filter_map(|cn| cn.as_str().ok())
                    .map(str::to_ascii_lowercase),
            );
        }
    }
    Ok(Loaded {
        key: Arc::new(key),
        names,
        not_after,
    })
}

/// The certificates of a listener, indexed for SNI.
pub struct CertSet {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` stored as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl CertSet {
    /// `loaded` in configuration order; the first name claimed wins.
    pub fn new(loaded: &[Arc<Loaded>], default: usize) -> Self {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for l in loaded {
            for n in &l.names {
                match n.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_owned()),
                    None => exact.entry(n.clone()),
                }
                .or_insert_with(|| l.key.clone());
            }
        }
        Self {
            exact,
            wildcard,
            default: loaded[default].key.clone(),
        }
    }

    pub fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni else {
            return self.default.clone();
        };
        // rustls lowercases SNI; be safe with anything else.
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        if let Some(k) = self.exact.get(name) {
            return k.clone();
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .unwrap_or(&self.default)
            .clone()
    }
}

/// rustls' hook: one lock-free load per handshake.
#[derive(Debug)]
pub struct SniResolver(pub ArcSwap<CertSet>);

impl std::fmt::Debug for CertSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSet")
            .field("names", &self.exact.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().pick(hello.server_name()))
    }
}

/// Keeps a listener's certificates in step with their files until `stop` turns true.
pub struct Reloader {
    pub listener: Arc<str>,
    pub configs: Vec<CertConfig>,
    pub default: usize,
    pub loaded: Vec<Arc<Loaded>>,
    /// The files of each certificate, in the order of `configs`.
    pub files: Vec<Polled>,
    pub resolver: Arc<SniResolver>,
    pub provider: Arc<CryptoProvider>,
    pub metrics: Arc<L4Metrics>,
}

impl Reloader {
    fn label(&self, i: usize) -> String {
        self.configs[i].cert.get_ref().display().to_string()
    }

    /// Sets the expiry gauges from what is loaded now.
    pub fn publish_expiry(&self) {
        for (i, l) in self.loaded.iter().enumerate() {
            self.metrics
                .tls_expiry
                .with_label_values(&[&*self.listener, &self.label(i)])
                .set((l.not_after - unix_now()) as f64);
        }
    }

    /// One poll: re-reads every file, rebuilds what changed. Returns whether the set changed.
    pub fn poll(&mut self) -> bool {
        let mut changed = false;
        for i in 0..self.configs.len() {
            let built = match self.files[i].poll() {
                Poll::Same => continue,
                Poll::Changed(contents) => build(&self.configs[i], &self.provider, &contents),
                Poll::Unreadable(e) => Err(e),
            };
            match built {
                Ok(l) => {
                    tracing::info!(listener = %self.listener, cert = %self.label(i), names = ?l.names,
                        "certificate reloaded");
                    self.metrics
                        .tls_reloads
                        .with_label_values(&[&self.listener, "ok"])
                        .inc();
                    self.loaded[i] = Arc::new(l);
                    changed = true;
                }
                // Once per change of the files (`Polled`), not every poll.
                Err(e) => {
                    tracing::error!(listener = %self.listener, error = %e,
                        "certificate reload failed; keeping the previous certificate");
                    self.metrics
                        .tls_reloads
                        .with_label_values(&[&self.listener, "error"])
                        .inc();
                }
            }
        }
        if changed {
            self.resolver
                .0
                .store(Arc::new(CertSet::new(&self.loaded, self.default)));
        }
        self.publish_expiry();
        changed
    }

    /// Polls until `stop` turns true.
    pub async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            self.poll();
        }
    }
}
