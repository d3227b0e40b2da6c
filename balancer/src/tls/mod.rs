//! TLS with rustls (ring provider): termination on listeners (SNI, ALPN, hot certificate
//! reload, expiry metric) and optional TLS towards upstream instances.
//!
//! Defaults are rustls' own: TLS 1.2 and 1.3 only, ECDHE key exchange, AEAD suites only
//! (no CBC, no RSA key exchange, no SHA-1 signatures).

pub mod certs;
pub mod client_auth;
pub mod polled;
pub mod upstream;

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::config::{ListenerConfig, ListenerProtocol};
use crate::l4config::ListenerTls;
use crate::l4metrics::L4Metrics;
use certs::{CertError, CertSet, Reloader, SniResolver, invalid};

/// Removes the expiry series of certificates `old` lists and `new` does not (a SIGHUP
/// replaced or removed a listener's TLS settings), so no alert fires for a certificate
/// that is no longer served.
pub fn forget_expiry(
    metrics: &L4Metrics,
    listener: &str,
    old: Option<&crate::l4config::ListenerTls>,
    new: Option<&crate::l4config::ListenerTls>,
) {
    let kept = |p: &std::path::Path| {
        new.is_some_and(|n| n.certificates.iter().any(|c| c.cert.get_ref() == p))
    };
    for c in old.iter().flat_map(|o| o.certificates.iter()) {
        if !kept(c.cert.get_ref()) {
            let label = c.cert.get_ref().display().to_string();
            let _ = metrics.tls_expiry.remove_label_values(&[listener, &label]);
        }
    }
}

/// Sets the CRL date series of `listener` from the TLS setup it serves with now (called
/// once that setup is in place: at start, and when a SIGHUP has swapped it in, so a
/// reload that fails later leaves the date of the CRL still in use). Without a CRL, or
/// without the listener, there is no series rather than a stale date.
pub fn publish_crl(metrics: &L4Metrics, listener: &str, tls: Option<&TlsListener>) {
    let gauge = &metrics.tls_crl_next_update;
    match tls.and_then(|t| t.crl_next_update) {
        Some(at) => gauge.with_label_values(&[listener]).set(at as f64),
        None => {
            let _ = gauge.remove_label_values(&[listener]);
        }
    }
}

/// TLS 1.2 sessions kept per listener for resumption by session ID.
const SESSION_CACHE: usize = 20_000;

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS listener's acceptor; its certificates follow their files while the reload task
/// runs — until this value is dropped (the listener stopped, or a SIGHUP replaced its TLS
/// settings).
pub struct TlsListener {
    pub acceptor: TlsAcceptor,
    /// Dropping it stops the reload task.
    reload: watch::Sender<bool>,
    /// The earliest `nextUpdate` of its client-certificate CRLs (Unix time).
    crl_next_update: Option<i64>,
}

impl TlsListener {
    /// Stops following the certificate files now (replaced by a SIGHUP), even while
    /// handshakes that started with this acceptor finish.
    pub fn stop_reloading(&self) {
        let _ = self.reload.send(true);
    }
}

/// Builds the acceptor of `l` (if it has `[listener.tls]`), loading every certificate now
/// (an unreadable file is an error), and spawns the reload task.
pub fn listener(
    l: &ListenerConfig,
    metrics: &Arc<L4Metrics>,
) -> Result<Option<TlsListener>, CertError> {
    let Some(tls) = &l.tls else {
        return Ok(None);
    };
    let provider = provider();
    let (loaded, files): (Vec<_>, Vec<_>) = tls
        .certificates
        .iter()
        .map(|c| certs::load_polled(c, &provider).map(|(l, f)| (Arc::new(l), f)))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .unzip();
    let default = tls.certificates.iter().position(|c| c.default).unwrap_or(0);
    let resolver = Arc::new(SniResolver(ArcSwap::from_pointee(CertSet::new(
        &loaded, default,
    ))));
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| invalid(Path::new("rustls"), e.to_string()))?;
    let (builder, crl_next_update) = match &tls.client_auth {
        Some(auth) => {
            let v = client_auth::verifier(auth, &provider)?;
            (
                builder.with_client_cert_verifier(v.verifier),
                v.crl_next_update,
            )
        }
        None => (builder.with_no_client_auth(), None),
    };
    let mut config = builder.with_cert_resolver(resolver.clone());
    set_resumption(&mut config, tls)?;
    config.alpn_protocols = match &tls.alpn {
        Some(list) => list.iter().map(|p| p.as_bytes().to_vec()).collect(),
        None if l.protocol == ListenerProtocol::Http => {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        }
        None => Vec::new(),
    };
    let name: Arc<str> = l.name.get_ref().as_str().into();
    let reloader = Reloader {
        listener: name.clone(),
        configs: tls.certificates.clone(),
        default,
        loaded,
        files,
        resolver,
        provider,
        metrics: metrics.clone(),
    };
    reloader.publish_expiry();
    // Both series exist from the start, so an alert on `error` needs no `absent()`.
    for result in ["ok", "error"] {
        metrics
            .tls_reloads
            .with_label_values(&[&name, result])
            .inc_by(0);
    }
    let (reload, stop) = watch::channel(false);
    tokio::spawn(reloader.run(stop));
    Ok(Some(TlsListener {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        reload,
        crl_next_update,
    }))
}

/// Session resumption as `[listener.tls]` asks. On: stateless tickets (sealed under keys
/// that rotate every 6 hours), so any number of clients can resume — rustls' default names
/// sessions in a 256-entry cache instead, about 128 returning clients at two tickets each
/// — and TLS 1.2 session IDs in a cache of HAProxy's default size (`tune.ssl.cachesize`).
fn set_resumption(config: &mut ServerConfig, tls: &ListenerTls) -> Result<(), CertError> {
    if tls.session_resumption {
        config.ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| invalid(Path::new("rustls"), format!("session ticket keys: {e}")))?;
        config.send_tls13_tickets = usize::from(tls.session_tickets);
        config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    } else {
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    }
    Ok(())
}
