//! The request path: route, pick, forward, stream back. Always answers.
//!
//! Per request: one `Arc<RoutingTable>` load, a route scan, a lock-free pick, a pooled
//! connection (or a new one), and the response streamed back through a body that returns
//! the connection to the pool when it ends. Errors become 502 (upstream broke), 503 (no
//! instance), 504 (timeout), 413/400 (client's fault) — never a dropped client connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::{BodyTooLarge, Lease, ReqBody, RespBody};
use crate::endpoint::{Endpoint, Sender, now_ms};
use crate::metrics::Metrics;
use crate::select;
use crate::table::{ListenerSettings, Route, RoutingTable, ServiceTable};

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
}

impl ConnInfo {
    pub fn new(listener: Arc<str>, peer: SocketAddr, shared: Arc<Shared>) -> Self {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            listener,
            peer,
            peer_ip,
            shared,
            tls: false,
        }
    }
}

const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Tokens of a `Connection` header that name no extra header to remove: the usual
/// `keep-alive` / `close`, and `upgrade` (handled by the caller).
fn names_no_extra_header(v: &HeaderValue) -> bool {
    v.to_str().unwrap_or("").split(',').all(|t| {
        let t = t.trim();
        t.is_empty()
            || t.eq_ignore_ascii_case("keep-alive")
            || t.eq_ignore_ascii_case("close")
            || t.eq_ignore_ascii_case("upgrade")
    })
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
///
/// Hot path (every request and every response): one scan over the names finds which
/// hop-by-hop headers are present, and only those are removed; nothing is allocated
/// unless `Connection` names extra headers.
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // Bit i: HOP_BY_HOP[i] present; bit 7: keep-alive; bit 8: proxy-connection.
    let mut present = 0u16;
    for n in h.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|hop| hop == n) {
            present |= 1 << i;
        } else if n == KEEP_ALIVE {
            present |= 1 << 7;
        } else if n == PROXY_CONNECTION {
            present |= 1 << 8;
        }
    }
    if present & 1 != 0 {
        let conn = h.get_all(header::CONNECTION);
        if !conn.iter().all(names_no_extra_header) {
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
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) == 0
            || (keep_upgrade && (n == header::UPGRADE || n == header::CONNECTION))
        {
            continue;
        }
        h.remove(n);
    }
    if present & (1 << 7) != 0 {
        h.remove(&KEEP_ALIVE);
    }
    if present & (1 << 8) != 0 {
        h.remove(&PROXY_CONNECTION);
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .unwrap_or("")
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
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
fn host_of(req: &Request<Incoming>) -> &str {
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("");
    match raw.rsplit_once(':') {
        // IPv6 literals keep their brackets: `[::1]:80` → `[::1]`.
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => raw,
    }
}

/// The head of an upstream request, to resend it without its (empty) body.
fn head_copy(r: &Request<ReqBody>) -> http::request::Parts {
    let mut c = Request::new(());
    *c.method_mut() = r.method().clone();
    *c.uri_mut() = r.uri().clone();
    *c.version_mut() = r.version();
    *c.headers_mut() = r.headers().clone();
    c.into_parts().0
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Opens a new HTTP/1.1 connection to an endpoint.
async fn connect(ep: &Endpoint, timeout: Duration) -> Result<Sender, ConnectError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(ep.addr))
        .await
        .map_err(|_| ConnectError::Timeout)?
        .map_err(ConnectError::Io)?;
    let _ = stream.set_nodelay(true);
    let (tx, conn) = hyper::client::conn::http1::Builder::new()
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(ConnectError::Handshake)?;
    tokio::spawn(async move {
        // Ends when the sender is dropped (pool closed) or the peer closes.
        let _ = conn.with_upgrades().await;
    });
    Ok(tx)
}

#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("connect: {0}")]
    Io(std::io::Error),
    #[error("handshake: {0}")]
    Handshake(hyper::Error),
}

fn caused_by_too_large(e: &hyper::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if s.is::<BodyTooLarge>() {
            return true;
        }
        src = s.source();
    }
    false
}

/// Counts a failure of `ep` and ejects it when the streak is long enough, unless too
/// much of the service is already ejected.
fn failed(ep: &Endpoint, svc: &ServiceTable, s: &ListenerSettings) {
    let streak = ep.record_failure();
    if s.outlier_failures == 0 || streak < s.outlier_failures {
        return;
    }
    let now = now_ms();
    let total = svc.member_count();
    let ejected = svc
        .groups
        .iter()
        .flat_map(|g| g.members.iter())
        .filter(|m| m.ep.is_ejected(now))
        .count();
    if ((ejected + 1) * 100) as u64 <= total as u64 * s.max_ejection_percent as u64 {
        ep.eject(s.base_ejection);
        svc.shared.ejections.inc();
        tracing::warn!(service = %ep.service, instance = %ep.id, streak, "outlier ejected");
    }
}

/// Everything needed to answer and account for one request.
struct Ctx<'a> {
    route: &'a Route,
    settings: &'a ListenerSettings,
    start: Instant,
}

impl Ctx<'_> {
    fn finish(&self, version: Option<usize>, resp: Response<RespBody>) -> Response<RespBody> {
        let status = resp.status().as_u16();
        match version.and_then(|v| self.route.by_version.get(v)) {
            Some(c) => c.inc(status),
            None => self.route.unpicked.inc(status),
        }
        self.route
            .histogram
            .observe(self.start.elapsed().as_secs_f64());
        resp
    }
}

pub async fn handle(
    req: Request<Incoming>,
    conn: Arc<ConnInfo>,
) -> Result<Response<RespBody>, Infallible> {
    let start = Instant::now();
    let table = conn.shared.table.load_full();
    let Some(listener) = table.listener(&conn.listener) else {
        return Ok(plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "listener is closing\n",
            true,
        ));
    };
    let Some(route) = listener.route(host_of(&req), req.uri().path()) else {
        listener.unrouted.inc(404);
        return Ok(plain(StatusCode::NOT_FOUND, "no route\n", false));
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
    let resp = forward(req, &conn, &ctx).await;
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
    Ok(resp)
}

async fn forward(mut req: Request<Incoming>, conn: &ConnInfo, ctx: &Ctx<'_>) -> Response<RespBody> {
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
    // Body limit: a declared length is checked now; a chunked body is cut off while it
    // streams (see `ReqBody`).
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
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
    let upgrade = is_upgrade(&req);
    // The answer speaks the client's protocol version, whatever the upstream spoke.
    let client_version = req.version();
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    // Rewrite the head for the upstream hop.
    let original_host = req.headers().get(header::HOST).cloned().or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    let h = &mut parts.headers;
    let xff = match h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => HeaderValue::from_str(&format!("{prev}, {}", conn.peer.ip())).ok(),
        None => Some(conn.peer_ip.clone()),
    };
    if let Some(v) = xff {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
    h.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
    if let Some(host) = original_host {
        if !h.contains_key(&X_FORWARDED_HOST) {
            h.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
        if !h.contains_key(header::HOST) {
            h.insert(header::HOST, host);
        }
    }
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = pq.parse::<Uri>().unwrap_or_else(|_| Uri::from_static("/"));
    }
    parts.version = Version::HTTP_11;
    let body = if body.is_end_stream() {
        ReqBody::Empty
    } else {
        ReqBody::Client {
            inner: body,
            seen: 0,
            limit: s.max_body_bytes,
        }
    };
    // An idempotent, body-less request reset on a reused keep-alive connection before any
    // answer (the upstream closed it as we wrote) is resent: `resend` then holds a copy of
    // the head, made only when the request goes out on a reused connection.
    let may_resend = matches!(body, ReqBody::Empty) && idempotent(&parts.method) && !upgrade;
    let mut resend: Option<http::request::Parts> = None;
    let mut pending = Some(Request::from_parts(parts, body));

    let mut tried: Vec<usize> = Vec::new();
    let mut attempts = 0u32;
    let mut last = StatusCode::BAD_GATEWAY;
    while let Some(member) = select::pick(svc, &tried) {
        let ep = member.ep.clone();
        let version = member.version;
        let in_flight = ep.start_request();

        // A pooled connection if one is alive, else a new one.
        let mut reused = false;
        let mut tx = None;
        while let Some(mut pooled) = ep.checkout() {
            if pooled.ready().await.is_ok() {
                tx = Some(pooled);
                reused = true;
                break;
            }
        }
        let mut tx = match tx {
            Some(tx) => tx,
            // Boxed: a new connection is the rare path, and its large future would
            // otherwise sit in every idle client connection's request slot (RSS).
            None => match Box::pin(connect(&ep, s.connect_timeout)).await {
                Ok(tx) => tx,
                Err(e) => {
                    svc.shared.connect_errors.inc();
                    ep.stats.record_failure();
                    failed(&ep, svc, s);
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

        let request = match pending.take() {
            Some(r) => r,
            None => match &resend {
                Some(p) => Request::from_parts(p.clone(), ReqBody::Empty),
                None => break,
            },
        };
        if reused && may_resend && resend.is_none() {
            resend = Some(head_copy(&request));
        }
        let sent = tokio::time::timeout(s.response_timeout, tx.try_send_request(request)).await;
        let mut resp = match sent {
            Err(_) => {
                ep.stats.record_failure();
                failed(&ep, svc, s);
                return ctx.finish(
                    Some(version),
                    plain(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n", false),
                );
            }
            Ok(Ok(resp)) => resp,
            Ok(Err(mut e)) => {
                if let Some(req) = e.take_message() {
                    // Never written: the connection closed under us. Same request, another
                    // connection; does not count against the budget.
                    pending = Some(req);
                    attempts += 1;
                    if attempts <= s.retries + 2 {
                        continue;
                    }
                    break;
                }
                let err = e.into_error();
                if caused_by_too_large(&err) {
                    return ctx.finish(
                        Some(version),
                        plain(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "request body too large\n",
                            true,
                        ),
                    );
                }
                if err.is_user() || err.is_body_write_aborted() {
                    // The client's body broke (bad chunk, disconnect): its fault.
                    return ctx.finish(
                        Some(version),
                        plain(StatusCode::BAD_REQUEST, "malformed request body\n", true),
                    );
                }
                tracing::debug!(instance = %ep.id, error = %err, reused, "upstream failed before answering");
                if !reused {
                    ep.stats.record_failure();
                    failed(&ep, svc, s);
                    tried.push(Arc::as_ptr(&ep) as usize);
                }
                attempts += 1;
                // A stale keep-alive connection is not the instance's fault: free retry.
                if resend.is_some()
                    && attempts <= s.retries + 1
                    && (reused || svc.shared.withdraw())
                {
                    svc.shared.retries_reset.inc();
                    continue;
                }
                last = StatusCode::BAD_GATEWAY;
                break;
            }
        };

        let status = resp.status();
        ep.stats.record_answer(status.as_u16(), ctx.start.elapsed());
        if status.is_server_error() {
            failed(&ep, svc, s);
        } else {
            ep.record_success();
        }
        strip_hop_by_hop(
            resp.headers_mut(),
            status == StatusCode::SWITCHING_PROTOCOLS,
        );
        if status == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client) = client_upgrade
        {
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let _in_flight = in_flight;
                if let (Ok(c), Ok(u)) = (client.await, upstream.await) {
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u))
                            .await;
                }
                drop(tx);
            });
            let (parts, _) = resp.into_parts();
            return ctx.finish(
                Some(version),
                Response::from_parts(parts, RespBody::empty()),
            );
        }
        let (mut parts, body) = resp.into_parts();
        parts.version = client_version;
        let body = RespBody::upstream(body, Lease { tx, in_flight });
        return ctx.finish(Some(version), Response::from_parts(parts, body));
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
