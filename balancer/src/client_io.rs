//! What happens to an accepted client connection before any HTTP or TCP proxying: the
//! PROXY protocol header (from trusted front balancers), then the TLS handshake. The result
//! is a [`ClientIo`] (plain or TLS, one type for every server loop) and the real client
//! address, which then flows into X-Forwarded-For, logs and PROXY headers to upstreams.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::cidr::Cidr;
use crate::config::ListenerConfig;
use crate::l4config::{AcceptProxy, ListenerTls};
use crate::l4metrics::L4Metrics;
use crate::proxy_protocol::{self, ProxyError};
use crate::tls::TlsListener;

/// A client connection after the PROXY header and the TLS handshake.
pub enum ClientIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl ClientIo {
    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            ClientIo::Plain(s) => s,
            ClientIo::Tls(t) => t.get_ref().0,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, ClientIo::Tls(_))
    }

    /// The certificate the client presented (mutual TLS), already verified by the handshake.
    pub fn client_cert(&self) -> Option<&[u8]> {
        match self {
            ClientIo::Plain(_) => None,
            ClientIo::Tls(t) => t.get_ref().1.peer_certificates()?.first().map(|c| &c[..]),
        }
    }

    /// The ALPN protocol the client and the listener agreed on.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            ClientIo::Plain(_) => None,
            ClientIo::Tls(t) => t.get_ref().1.alpn_protocol(),
        }
    }
}

crate::plain_or_tls::impl_plain_or_tls_io!(ClientIo);

/// How untrusted sources are checked for a PROXY header they should not send: bytes that
/// arrive within this window are inspected; a client that waits for the server to speak
/// first (SMTP, MySQL…) is let through after it.
const SNIFF: Duration = Duration::from_millis(200);

/// The configuration a [`ClientSetup`] was built from: a SIGHUP that changes it gives a
/// surviving listener a new setup (its accept loop reads the current one per connection),
/// without touching the listening socket or established connections.
#[derive(Debug, Clone, PartialEq)]
pub struct SetupConfig {
    tls: Option<ListenerTls>,
    /// The bytes of the client-auth CA and CRL files as read now: a SIGHUP after one
    /// changed rebuilds the setup even when lb.toml did not change (certificates are
    /// followed on their own, these files are not).
    client_auth_files: [Option<Vec<u8>>; 2],
    proxy: Option<AcceptProxy>,
    allow: Option<Box<[Cidr]>>,
    handshake_timeout: Duration,
}

impl SetupConfig {
    pub fn tls(&self) -> Option<&ListenerTls> {
        self.tls.as_ref()
    }

    pub fn of(l: &ListenerConfig) -> Self {
        let ca = l.tls.as_ref().and_then(|t| t.client_auth.as_ref());
        Self {
            tls: l.tls.clone(),
            client_auth_files: [
                ca.and_then(|a| std::fs::read(a.ca.get_ref()).ok()),
                ca.and_then(|a| std::fs::read(a.crl.as_ref()?).ok()),
            ],
            proxy: l.proxy_protocol.clone(),
            allow: crate::cidr::cidrs(&l.allow_sources),
            handshake_timeout: l.header_read_timeout,
        }
    }
}

/// A listener's setup, swapped whole on SIGHUP.
pub type SharedSetup = Arc<arc_swap::ArcSwap<ClientSetup>>;

/// An accepted client connection, ready for the server loops.
pub struct Accepted {
    pub io: ClientIo,
    /// The real client: the socket's peer, or the source a trusted PROXY header announced.
    pub client: SocketAddr,
    /// The destination a trusted PROXY header announced (relayed in PROXY headers sent
    /// upstream, as HAProxy does); `None`: the socket's own local address.
    pub destination: Option<SocketAddr>,
}

/// A listener's pre-proxy steps.
pub struct ClientSetup {
    pub listener: Arc<str>,
    pub tls: Option<TlsListener>,
    /// `[listener.proxy_protocol]`: the trusted source ranges.
    pub proxy: Option<Vec<Cidr>>,
    /// `allow_sources`: the clients served; `None`: every client.
    pub allow: Option<Box<[Cidr]>>,
    /// Time for the PROXY header and the TLS handshake together.
    pub handshake_timeout: Duration,
    pub metrics: Arc<L4Metrics>,
    /// What it was built from.
    pub config: SetupConfig,
}

impl ClientSetup {
    /// Replaced or no longer used: its certificates stop being polled from disk.
    pub fn retire(&self) {
        if let Some(t) = &self.tls {
            t.stop_reloading();
        }
    }

    pub fn new(l: &ListenerConfig, tls: Option<TlsListener>, metrics: Arc<L4Metrics>) -> Self {
        Self {
            listener: l.name.get_ref().as_str().into(),
            tls,
            proxy: l.proxy_protocol.as_ref().map(|p| p.cidrs()),
            allow: crate::cidr::cidrs(&l.allow_sources),
            handshake_timeout: l.header_read_timeout,
            metrics,
            config: SetupConfig::of(l),
        }
    }

    /// Nothing to do: the plain socket is used as it is.
    pub fn is_passthrough(&self) -> bool {
        self.tls.is_none() && self.proxy.is_none() && self.allow.is_none()
    }

    fn reject(&self, peer: SocketAddr, reason: &'static str, e: &dyn std::fmt::Display) {
        tracing::debug!(listener = %self.listener, %peer, reason, error = %e, "PROXY header rejected");
        self.metrics
            .proxy_rejected
            .with_label_values(&[&self.listener, reason])
            .inc();
    }

    /// PROXY header, then the client's source (`allow_sources`), then TLS. `None`: the
    /// connection was refused or failed (logged and counted); the caller just drops it.
    pub async fn accept(&self, mut tcp: TcpStream, peer: SocketAddr) -> Option<Accepted> {
        let done = |io, client, destination| {
            Some(Accepted {
                io,
                client,
                destination,
            })
        };
        if self.is_passthrough() {
            return done(ClientIo::Plain(tcp), peer, None);
        }
        let deadline = tokio::time::Instant::now() + self.handshake_timeout;
        let mut client = peer;
        let mut destination = None;
        if let Some(trusted) = &self.proxy {
            if trusted.iter().any(|c| c.contains(peer.ip())) {
                match tokio::time::timeout_at(deadline, proxy_protocol::read_header(&mut tcp)).await
                {
                    Ok(Ok(h)) => {
                        client = h.source.unwrap_or(peer);
                        destination = h.destination;
                    }
                    Ok(Err(e)) => {
                        let reason = match e {
                            ProxyError::Missing => "missing",
                            ProxyError::Eof => "eof",
                            ProxyError::Malformed(_) => "malformed",
                        };
                        self.reject(peer, reason, &e);
                        return None;
                    }
                    Err(_) => {
                        self.reject(peer, "timeout", &"no PROXY header in time");
                        return None;
                    }
                }
            } else if sniff_header(&tcp).await {
                self.reject(peer, "untrusted", &"PROXY header from an untrusted source");
                return None;
            }
        }
        // The real client (a trusted front balancer's announced one) is checked, and before
        // any TLS handshake is paid for.
        if !crate::cidr::allowed(self.allow.as_deref(), client.ip()) {
            tracing::debug!(listener = %self.listener, %client, "client outside allow_sources");
            self.metrics
                .source_refused
                .with_label_values(&[&self.listener])
                .inc();
            return None;
        }
        let Some(tls) = &self.tls else {
            return done(ClientIo::Plain(tcp), client, destination);
        };
        let result = tokio::time::timeout_at(deadline, tls.acceptor.accept(tcp)).await;
        let label = match &result {
            Ok(Ok(_)) => "ok",
            Ok(Err(_)) => "error",
            Err(_) => "timeout",
        };
        self.metrics
            .tls_handshakes
            .with_label_values(&[&self.listener, label])
            .inc();
        match result {
            Ok(Ok(s)) => done(ClientIo::Tls(Box::new(s)), client, destination),
            Ok(Err(e)) => {
                tracing::debug!(listener = %self.listener, peer = %client, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => None,
        }
    }
}

/// Whether an untrusted client's first bytes (if any come within [`SNIFF`]) start a
/// PROXY header. Peeks only: nothing is consumed.
async fn sniff_header(tcp: &TcpStream) -> bool {
    let deadline = tokio::time::Instant::now() + SNIFF;
    let mut buf = [0u8; 12];
    loop {
        match tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => match proxy_protocol::starts_header(&buf[..n]) {
                Some(v) => return v,
                // A prefix of a signature: wait for more bytes (bounded by the deadline).
                None => {
                    if tokio::time::Instant::now() >= deadline {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            },
            // EOF, error or nothing sent in time.
            _ => return false,
        }
    }
}
