//! The request path: route, pick, forward, stream back. Always answers.
//!
//! Per request: one `Arc<RoutingTable>` load, a route scan, a lock-free pick, a pooled
//! connection (or a new one), and the response streamed back through a body that returns
//! the connection to the pool when it ends. Errors become 502 (upstream broke), 503 (no
//! instance), 504 (timeout), 413/400 (client's fault) — never a dropped client connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt as _;
use tokio::time::Sleep;

use crate::body::{Lease, RespBody, Tunnel};
use crate::deadline;
use crate::endpoint::{Endpoint, InFlight};
use crate::h1_head;
use crate::h1_request::RawHead;
use crate::metrics::Metrics;
use crate::outlier;
use crate::select;
use crate::table::{ListenerSettings, Route, RoutingTable, ServiceTable};
use crate::tcp::UpstreamOpts;
use crate::upstream::{self, Head, UpConn, UpError};

/// State shared by every connection of every listener.
pub struct Shared {
    pub table: ArcSwap<RoutingTable>,
    pub metrics: Arc<Metrics>,
}

/// What a client connection knows about itself.
pub struct ConnInfo {
    pub listener: Arc<str>,
    pub peer: SocketAddr,
    /// The peer's IP as a header value, made once per connection for X-Forwarded-For.
    pub peer_ip: HeaderValue,
    pub shared: Arc<Shared>,
    /// The client connection is TLS: X-Forwarded-Proto is `https`.
    pub tls: bool,
    /// The address the client connected to (the destination of PROXY headers sent
    /// upstream); `None`: the instance's address stands in.
    pub local: Option<SocketAddr>,
    /// Made on first use: upstream connections that sent a PROXY header for this client
    /// connection hold a `Weak` of it, serve it only, and are closed once it is gone.
    owner: std::sync::OnceLock<Arc<()>>,
}

impl ConnInfo {
    pub fn owner(&self) -> &Arc<()> {
        self.owner.get_or_init(Arc::default)
    }

    pub fn new(listener: Arc<str>, peer: SocketAddr, shared: Arc<Shared>) -> Self {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            listener,
            peer,
            peer_ip,
            shared,
            tls: false,
            local: None,
            owner: std::sync::OnceLock::new(),
        }
    }
}

/// Removes hop-by-hop headers (the names of [`h1_head::is_hop_by_hop`], the one list for
/// both paths), including those the `Connection` header names (responses to HTTP/2 clients
/// and 101s; HTTP/1 heads are filtered as bytes, see [`h1_head`]).
///
/// One scan over the names finds which hop-by-hop headers are present (at most nine, kept
/// in a fixed array), and only those are removed; nothing is allocated unless `Connection`
/// names extra headers.
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let mut present: [Option<HeaderName>; 9] = Default::default();
    for (slot, n) in present.iter_mut().zip(
        h.keys()
            .filter(|n| h1_head::is_hop_by_hop(n.as_str().as_bytes())),
    ) {
        *slot = Some(n.clone());
    }
    if present.iter().flatten().any(|n| n == header::CONNECTION) {
        let conn = h.get_all(header::CONNECTION);
        if !conn
            .iter()
            .all(|v| h1_head::names_no_extra_header(v.as_bytes()))
        {
            // Rare: the header names extra hop-by-hop headers.
            let named: Vec<HeaderName> = conn
                .iter()
                .flat_map(|v| v.to_str().unwrap_or("").split(','))
                .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
                .filter(|n| !(keep_upgrade && n == header::UPGRADE))
                .collect();
            for n in named {
                h.remove(n);
            }
        }
    }
    for n in present.into_iter().flatten() {
        if keep_upgrade && (n == header::UPGRADE || n == header::CONNECTION) {
            continue;
        }
        h.remove(n);
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// An HTTP/1.1 `Upgrade` request (the HTTP/1 parser decides the same from the raw head).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| upstream::has_token(v.as_bytes(), "upgrade"))
}

pub fn plain(status: StatusCode, msg: &'static str, close: bool) -> Response<RespBody> {
    let mut r = Response::new(RespBody::full(msg));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if close {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// Host of the request without port, from `Host` or the URI authority (HTTP/2).
fn host_of<'a>(headers: h1_head::ReqHeaders<'a>, uri: &'a http::Uri) -> &'a str {
    let raw = headers
        .host()
        .and_then(|h| std::str::from_utf8(h).ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    match raw.rsplit_once(':') {
        // IPv6 literals keep their brackets: `[::1]:80` → `[::1]`.
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => raw,
    }
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Opens a new connection to an endpoint: plain, or as the service's upstream options
/// say (PROXY header, TLS handshake — both within `timeout`).
async fn connect(
    ep: &Endpoint,
    timeout: Duration,
    opts: Option<&Arc<UpstreamOpts>>,
    conn: &ConnInfo,
) -> Result<UpConn, ConnectError> {
    let up = match opts {
        None => tokio::time::timeout(timeout, UpConn::connect(ep.addr)).await,
        Some(opts) => {
            let local = conn.local.unwrap_or(ep.addr);
            let owner = opts.proxy.map(|_| conn.owner());
            let open = UpConn::connect_with(ep.addr, opts, conn.peer, local, owner);
            tokio::time::timeout(timeout, open).await
        }
    };
    up.map_err(|_| ConnectError::Timeout)?
        .map_err(ConnectError::Io)
}

#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("connect: {0}")]
    Io(std::io::Error),
}

/// Why one request/response exchange with an upstream failed.
#[derive(Debug, thiserror::Error)]
enum Fail {
    /// The head could not be written: nothing reached the upstream.
    #[error("writing the request head: {0}")]
    HeadWrite(std::io::Error),
    #[error("request body exceeds the limit")]
    BodyTooLarge,
    /// The client's body broke (bad chunk, disconnect): its fault.
    #[error("client body: {0}")]
    ClientBody(BoxError),
    #[error("writing the request body: {0}")]
    BodyWrite(std::io::Error),
    #[error("{0}")]
    Response(UpError),
}

/// Writes the head and streams the client's body, then reads the response head.
async fn exchange<B>(
    up: &mut UpConn,
    head: &[u8],
    body: &mut B,
    chunked: bool,
    limit: u64,
    method: &Method,
    lines: Option<Version>,
) -> Result<Head, Fail>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    up.write_all(head).await.map_err(Fail::HeadWrite)?;
    if !body.is_end_stream() {
        let mut seen = 0u64;
        let mut piece = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Fail::ClientBody(e.into()))?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers: not forwarded
            };
            if data.is_empty() {
                continue;
            }
            seen += data.len() as u64;
            if seen > limit {
                return Err(Fail::BodyTooLarge);
            }
            if chunked {
                piece.clear();
                upstream::chunk_head(&mut piece, data.len());
                piece.extend_from_slice(&data);
                piece.extend_from_slice(b"\r\n");
                up.write_all(&piece).await.map_err(Fail::BodyWrite)?;
            } else {
                up.write_all(&data).await.map_err(Fail::BodyWrite)?;
            }
        }
        if chunked {
            up.write_all(upstream::LAST_CHUNK)
                .await
                .map_err(Fail::BodyWrite)?;
        }
    }
    up.read_head(method, lines).await.map_err(Fail::Response)
}

/// Everything needed to answer and account for one request.
struct Ctx<'a> {
    route: &'a Route,
    settings: &'a ListenerSettings,
    start: Instant,
}

impl Ctx<'_> {
    fn finish(&self, version: Option<usize>, resp: Response<RespBody>) -> Response<RespBody> {
        self.record(version, resp.status(), self.start.elapsed());
        resp
    }

    /// Accounts for an answer whose duration is already measured (the answer path reads
    /// the clock once for the endpoint's status-page histogram and the request metrics
    /// both). Takes the status, not the response: moving a response in and out costs two
    /// copies of it.
    fn record(&self, version: Option<usize>, status: StatusCode, elapsed: Duration) {
        let (status, seconds) = (status.as_u16(), elapsed.as_secs_f64());
        match version.and_then(|v| self.route.by_version.get(v)) {
            Some(c) => c.record(status, seconds),
            None => self.route.unpicked.record(status, seconds),
        }
    }
}

/// How the client side takes over the connection after a 101.
pub enum ClientUpgrade {
    /// Not an upgrade request.
    No,
    /// hyper's server hands the connection over through this.
    Hyper(OnUpgrade),
    /// The caller (the own HTTP/1 server) runs the tunnel: it gets a `RespBody::Tunnel`.
    Inline,
}

/// hyper's service entry (HTTP/2 connections).
pub async fn handle(
    mut req: Request<Incoming>,
    conn: Arc<ConnInfo>,
) -> Result<Response<RespBody>, Infallible> {
    let upgrade = if is_upgrade(&req) {
        ClientUpgrade::Hyper(hyper::upgrade::on(&mut req))
    } else {
        ClientUpgrade::No
    };
    Ok(serve_request(&mut req, upgrade, &conn, None).await)
}

/// What the own HTTP/1 server hands over with a request (HTTP/2 requests come from hyper
/// without it).
pub struct H1Client<'a> {
    /// The request's header lines (its `Request` carries no headers).
    pub head: &'a RawHead,
    /// The connection's reusable timer, for the response deadline (else a tokio timer
    /// per request).
    pub timer: Pin<&'a mut Sleep>,
    /// An upstream answer's header lines go here as bytes (the response then carries no
    /// headers of its own), not into a `HeaderMap`.
    pub lines: &'a mut Option<h1_head::Lines>,
}

/// Routes, forwards and accounts for one request.
pub async fn serve_request<B>(
    req: &mut Request<B>,
    upgrade: ClientUpgrade,
    conn: &ConnInfo,
    h1: Option<H1Client<'_>>,
) -> Response<RespBody>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let start = Instant::now();
    let table = conn.shared.table.load_full();
    let Some(listener) = table
        .listener(&conn.listener)
        .filter(|l| l.protocol == crate::config::ListenerProtocol::Http)
    else {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "listener is closing\n",
            true,
        );
    };
    let headers = h1_head::ReqHeaders::of(h1.as_ref().map(|c| c.head), req.headers());
    let Some(route) = listener.route(|| host_of(headers, req.uri()), req.uri().path()) else {
        listener.unrouted.inc(404);
        return plain(StatusCode::NOT_FOUND, "no route\n", false);
    };
    let ctx = Ctx {
        route,
        settings: &listener.settings,
        start,
    };
    let (method, path) = if ctx.settings.access_log {
        (
            Some(req.method().clone()),
            Some(req.uri().path().to_owned()),
        )
    } else {
        (None, None)
    };
    let resp = forward(req, upgrade, conn, &ctx, h1).await;
    if let (Some(m), Some(p)) = (method, path) {
        tracing::info!(
            target: "access",
            listener = %listener.name,
            client = %conn.peer,
            method = %m,
            path = %p,
            service = %route.service_name,
            status = resp.status().as_u16(),
            micros = start.elapsed().as_micros() as u64,
        );
    }
    resp
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn forward<B>(
    req: &mut Request<B>,
    client_upgrade: ClientUpgrade,
    conn: &ConnInfo,
    ctx: &Ctx<'_>,
    h1: Option<H1Client<'_>>,
) -> Response<RespBody>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let s = ctx.settings;
    let Some(svc) = ctx.route.service.as_deref().filter(|s| !s.is_empty()) else {
        return ctx.finish(
            None,
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "no backend available\n",
                false,
            ),
        );
    };
    svc.shared.deposit(s.retry_budget_percent);
    let (raw, mut timer, mut lines_out) = match h1 {
        Some(c) => (Some(c.head), Some(c.timer), Some(c.lines)),
        None => (None, None, None),
    };
    let headers = h1_head::ReqHeaders::of(raw, req.headers());
    // Body limit: a declared length is checked now; a chunked body is cut off while it
    // streams (see `exchange`).
    let declared = headers.content_length();
    if let Some(Some(len)) = declared
        && len > s.max_body_bytes
    {
        return ctx.finish(
            None,
            plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large\n",
                true,
            ),
        );
    }
    let upgrade = !matches!(client_upgrade, ClientUpgrade::No);
    // The answer speaks the client's protocol version, whatever the upstream spoke.
    let client_version = req.version();

    // The request stays where the caller keeps it (borrowed, not moved: it is large).
    let has_body = !req.body().is_end_stream();
    // A body of unknown length (chunked from an HTTP/1.1 client, or HTTP/2 without
    // content-length) goes upstream chunked.
    let chunked = has_body && declared.is_none();
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    // The head for the upstream hop, encoded straight from the client's headers.
    let mut head = Vec::with_capacity(256 + headers.encoded_len_hint());
    h1_head::encode_request(
        &mut head,
        req.method(),
        target,
        headers,
        &h1_head::Forwarded {
            peer_ip: &conn.peer_ip,
            tls: conn.tls,
            authority: req.uri().authority().map(|a| a.as_str()),
            upgrade,
            chunked,
        },
    );
    // Standard methods clone without allocating.
    let method = req.method().clone();
    let body = req.body_mut();
    // An idempotent, body-less request whose connection is reset before any answer (a
    // reused keep-alive connection the upstream closed as we wrote, or a crash) is
    // resent: the head is still in `head`.
    let may_resend = !has_body && idempotent(&method) && !upgrade;

    let mut tried: Vec<usize> = Vec::new();
    let mut attempts = 0u32;
    let mut last = StatusCode::BAD_GATEWAY;
    while let Some(member) = select::pick(svc, &tried, ctx.start) {
        let ep = member.ep.clone();
        let version = member.version;
        let in_flight = ep.start_request();

        // A pooled connection if one is alive, else a new one. A request with a body
        // cannot be resent, so its pooled connection is checked first.
        let mut up = None;
        let opts = ctx.route.upstream.as_ref();
        let owner = opts.filter(|o| o.proxy.is_some()).map(|_| conn.owner());
        while let Some(mut pooled) = ep.checkout(ctx.start, |c| c.fits(opts, owner)) {
            if !has_body || pooled.looks_alive() {
                up = Some(pooled);
                break;
            }
        }
        let reused = up.is_some();
        let mut up = match up {
            Some(up) => up,
            // Boxed: a new connection is the rare path, and its large future would
            // otherwise sit in every idle client connection's request slot (RSS).
            None => match Box::pin(connect(&ep, s.connect_timeout, opts, conn)).await {
                Ok(up) => up,
                Err(e) => {
                    svc.shared.connect_errors.inc();
                    no_answer(&ep, svc, s);
                    tracing::debug!(instance = %ep.id, addr = %ep.addr, error = %e, "connect failed");
                    last = if matches!(e, ConnectError::Timeout) {
                        StatusCode::GATEWAY_TIMEOUT
                    } else {
                        StatusCode::BAD_GATEWAY
                    };
                    tried.push(Arc::as_ptr(&ep) as usize);
                    attempts += 1;
                    if attempts <= s.retries && svc.shared.withdraw() {
                        svc.shared.retries_connect.inc();
                        continue;
                    }
                    break;
                }
            },
        };

        let sent = {
            let exchanged = exchange(
                &mut up,
                &head,
                &mut *body,
                chunked,
                s.max_body_bytes,
                &method,
                lines_out.is_some().then_some(client_version),
            );
            // Pinned here: the deadline wrapper borrows it instead of taking in a copy.
            tokio::pin!(exchanged);
            match timer.as_mut() {
                Some(t) => {
                    // The request's start stands for "now" on the first attempt over a pooled
                    // connection (microseconds ago): one clock read less per request.
                    let from = if reused && attempts == 0 {
                        ctx.start
                    } else {
                        Instant::now()
                    };
                    let at = tokio::time::Instant::from_std(from + s.response_timeout);
                    deadline::within_at(t.as_mut(), at, exchanged.as_mut())
                        .await
                        .map_err(|_| ())
                }
                None => tokio::time::timeout(s.response_timeout, exchanged.as_mut())
                    .await
                    .map_err(|_| ()),
            }
        };
        let resp = match sent {
            Err(_) => {
                no_answer(&ep, svc, s);
                return ctx.finish(
                    Some(version),
                    plain(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n", false),
                );
            }
            Ok(Ok(resp)) => resp,
            Ok(Err(Fail::HeadWrite(e))) if reused => {
                // Never reached the upstream: the connection closed under us. Same
                // request, another connection; does not count against the budget.
                tracing::debug!(instance = %ep.id, error = %e, "stale pooled connection");
                ep.clear_idle();
                attempts += 1;
                if attempts <= s.retries + 2 {
                    continue;
                }
                break;
            }
            Ok(Err(Fail::BodyTooLarge)) => {
                return ctx.finish(
                    Some(version),
                    plain(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "request body too large\n",
                        true,
                    ),
                );
            }
            Ok(Err(Fail::ClientBody(e))) => {
                tracing::debug!(error = %e, "client body broke");
                return ctx.finish(
                    Some(version),
                    plain(StatusCode::BAD_REQUEST, "malformed request body\n", true),
                );
            }
            Ok(Err(e)) => {
                tracing::debug!(instance = %ep.id, error = %e, reused, "upstream failed before answering");
                let stale = reused && matches!(e, Fail::Response(UpError::ClosedBeforeResponse));
                if stale {
                    ep.clear_idle();
                } else {
                    no_answer(&ep, svc, s);
                    tried.push(Arc::as_ptr(&ep) as usize);
                }
                attempts += 1;
                // A stale keep-alive connection is not the instance's fault: free retry.
                if may_resend
                    && matches!(e, Fail::Response(UpError::ClosedBeforeResponse))
                    && attempts <= s.retries + 1
                    && (stale || svc.shared.withdraw())
                {
                    svc.shared.retries_reset.inc();
                    continue;
                }
                last = StatusCode::BAD_GATEWAY;
                break;
            }
        };

        let status = resp.status;
        let elapsed = ctx.start.elapsed();
        ep.stats.record_answer(status.as_u16(), elapsed);
        if status.is_server_error() {
            outlier::record_failure(&ep, svc, s);
        } else {
            ep.record_success();
        }
        let mut headers = resp.headers;
        let switching = status == StatusCode::SWITCHING_PROTOCOLS;
        match (resp.lines, lines_out.as_deref_mut()) {
            (Some(l), Some(out)) => *out = Some(l),
            _ => strip_hop_by_hop(&mut headers, switching),
        }
        if switching {
            let body = match client_upgrade {
                ClientUpgrade::Hyper(client) => {
                    tokio::spawn(tunnel(client, up, in_flight));
                    RespBody::empty()
                }
                ClientUpgrade::Inline => RespBody::Tunnel(Some(Tunnel {
                    conn: up,
                    in_flight,
                })),
                ClientUpgrade::No => {
                    // Switched without being asked: nothing sane to pass on.
                    outlier::record_failure(&ep, svc, s);
                    last = StatusCode::BAD_GATEWAY;
                    break;
                }
            };
            let mut r = Response::new(body);
            *r.status_mut() = status;
            *r.headers_mut() = headers;
            ctx.record(Some(version), status, elapsed);
            return r;
        }
        let mut r = Response::new(RespBody::upstream(Lease {
            conn: up,
            framing: resp.framing,
            keep_alive: resp.keep_alive,
            in_flight,
            answered: ctx.start + elapsed,
        }));
        *r.status_mut() = status;
        *r.version_mut() = client_version;
        *r.headers_mut() = headers;
        ctx.record(Some(version), status, elapsed);
        return r;
    }
    let resp = if last == StatusCode::GATEWAY_TIMEOUT {
        plain(last, "upstream connect timed out\n", false)
    } else if tried.is_empty() && attempts == 0 {
        plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "no backend available\n",
            false,
        )
    } else {
        plain(StatusCode::BAD_GATEWAY, "upstream unavailable\n", false)
    };
    ctx.finish(None, resp)
}

/// An attempt at `ep` that got no answer (connect error, timeout, broken connection):
/// an error on the status page and a step towards ejection.
fn no_answer(ep: &Endpoint, svc: &ServiceTable, s: &ListenerSettings) {
    ep.stats.record_failure();
    outlier::record_failure(ep, svc, s);
}

/// After a 101: bytes both ways between the client and the upstream until either closes.
async fn tunnel(client: OnUpgrade, up: UpConn, in_flight: InFlight) {
    let _in_flight = in_flight;
    let Ok(client) = client.await else {
        return;
    };
    let mut client = TokioIo::new(client);
    let (mut io, early) = up.into_parts();
    if !early.is_empty() && client.write_all(&early).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut io).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_headers_named_by_every_connection_line() {
        let mut h = map(&[
            ("host", "a"),
            ("connection", "keep-alive"),
            ("connection", "X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|n| n.as_str().to_owned()).collect();
        names.sort();
        assert_eq!(names, ["host", "x-kept"]);
    }

    #[test]
    fn plain_keep_alive_response_loses_only_its_hop_headers() {
        let mut h = map(&[
            ("server", "nginx"),
            ("content-length", "100"),
            ("connection", "keep-alive"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2);
        assert!(h.contains_key("content-length") && h.contains_key("server"));
    }

    #[test]
    fn upgrade_keeps_upgrade_and_says_connection_upgrade() {
        let mut h = map(&[
            ("connection", "Upgrade, x-drop"),
            ("upgrade", "websocket"),
            ("x-drop", "1"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
        assert!(!h.contains_key("x-drop"));
    }
}
