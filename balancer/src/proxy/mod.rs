//! The request path: route, pick, forward, stream back. Always answers.
//!
//! Per request: one `Arc<RoutingTable>` load, a route scan, a lock-free pick, a pooled
//! connection (or a new one), and the response streamed back through a body that returns
//! the connection to the pool when it ends. Errors become 502 (upstream broke), 503 (no
//! instance), 504 (timeout), 413/400 (client's fault) — never a dropped client connection.
//!
//! Here: the entry points (`serve_request` for the own HTTP/1 server, `handle` for hyper's
//! HTTP/2 server), routing and accounting. `forward`: pick, connection reuse, retries,
//! error mapping, 101 tunnels; `exchange`: one attempt on one upstream connection;
//! `headers`: the `http`-typed header rules (hop-by-hop, upgrade, host, idempotency).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use tokio::time::Sleep;

use crate::body::RespBody;
use crate::h1_head;
use crate::h1_request::RawHead;
use crate::header_rules::Answer;
use crate::metrics::Metrics;
use crate::table::{ListenerSettings, Route, RoutingTable};

mod exchange;
mod forward;
mod forward_h2;
mod headers;
mod redirect;
mod tries;

use headers::host_of;
pub use headers::is_upgrade;

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
    /// The client's verified certificate (mutual TLS) as an `X-Forwarded-Client-Cert`
    /// value, made once per connection.
    pub client_cert: Option<HeaderValue>,
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
            client_cert: None,
            local: None,
            owner: std::sync::OnceLock::new(),
        }
    }
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

/// The answer to a client the route turns away: 403 outside its `allow_sources`, 429 over
/// its `rate_limit`.
#[cold]
#[inline(never)]
fn refuse_client(route: &Route, ip: std::net::IpAddr, now: Instant) -> Option<Response<RespBody>> {
    if !crate::cidr::allowed(route.allow.as_deref(), ip) {
        return Some(plain(StatusCode::FORBIDDEN, "forbidden\n", false));
    }
    let wait = route.rate_limit.as_ref()?.check(ip, now).err()?;
    Some(too_many(wait))
}

/// A `rate_limit`ed request's answer: 429 with the whole seconds until it may try again.
fn too_many(wait: Duration) -> Response<RespBody> {
    let mut r = plain(StatusCode::TOO_MANY_REQUESTS, "too many requests\n", false);
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    r
}

/// Everything needed to answer and account for one request.
struct Ctx<'a> {
    route: &'a Route,
    settings: &'a ListenerSettings,
    start: Instant,
    /// The instance that answered, kept for the access log (only when it is on).
    served: std::sync::OnceLock<Arc<crate::endpoint::Endpoint>>,
    /// The request's id (`request_id_header`), for the answer and the access log.
    request_id: std::sync::OnceLock<HeaderValue>,
}

impl Ctx<'_> {
    fn finish(&self, version: Option<usize>, mut resp: Response<RespBody>) -> Response<RespBody> {
        self.record(version, resp.status(), self.start.elapsed());
        if self.edits_answers() {
            self.edit_answer(Answer::Map(resp.headers_mut()), None);
        }
        resp
    }

    /// The route or listener changes answers' headers (`response_headers`, `sticky_cookie`,
    /// `request_id_header`): one test for the common answer path.
    fn edits_answers(&self) -> bool {
        self.route.response_rules.is_some()
            || self.route.sticky.is_some()
            || self.settings.request_id.is_some()
    }

    /// What the route and listener change in an answer's headers, the instance's or the
    /// balancer's own: the `response_headers` rules, the sticky cookie when the client did
    /// not name `served` (`(served, named, tls)`; `None` for the balancer's own answers),
    /// and the request's id.
    #[cold]
    #[inline(never)]
    fn edit_answer(&self, mut answer: Answer<'_>, sticky: Option<(u64, Option<u64>, bool)>) {
        if let Some(r) = &self.route.response_rules {
            r.apply(&mut answer);
        }
        if let (Some(s), Some((served, named, tls))) = (&self.route.sticky, sticky)
            && named != Some(served)
        {
            answer.append(&http::header::SET_COOKIE, s.set_cookie(served, tls));
        }
        if let (Some(name), Some(id)) = (&self.settings.request_id, self.request_id.get()) {
            answer.set(name, id);
        }
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
    let mut req = req.map(|b| Owned(Some(b)));
    Ok(serve_request(&mut req, upgrade, &conn, None).await)
}

/// A client's request body as the proxy path reads it. An HTTP/2 instance needs the body
/// owned (its stream outlives the call that sends it): hyper's body can be handed over
/// whole; the own HTTP/1 server's borrows the client connection and is pumped instead.
pub trait ClientBody: http_body::Body<Data = Bytes> + Unpin {
    /// The body itself, if it can be moved out (what is left behind is empty).
    fn take_owned(&mut self) -> Option<Incoming> {
        None
    }
}

/// hyper's request body, in a slot it can be taken out of.
pub struct Owned(Option<Incoming>);

impl http_body::Body for Owned {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        match &mut self.0 {
            Some(b) => Pin::new(b).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0
            .as_ref()
            .map_or(http_body::SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl ClientBody for Owned {
    fn take_owned(&mut self) -> Option<Incoming> {
        self.0.take()
    }
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
    B: ClientBody,
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
    if let Some(port) = listener.settings.redirect_https {
        let target = h1_head::origin_form(req.uri());
        let resp = redirect::to_https(host_of(headers, req.uri()), &target, port, req.method());
        listener.unrouted.inc(resp.status().as_u16());
        return resp;
    }
    let Some(route) = listener.route(|| host_of(headers, req.uri()), req.uri().path()) else {
        listener.unrouted.inc(404);
        return plain(StatusCode::NOT_FOUND, "no route\n", false);
    };
    let ctx = Ctx {
        route,
        settings: &listener.settings,
        start,
        served: std::sync::OnceLock::new(),
        request_id: std::sync::OnceLock::new(),
    };
    // One test on the common path; the checks themselves are out of line.
    if route.checks_clients
        && let Some(refused) = refuse_client(route, conn.peer.ip(), start)
    {
        return ctx.finish(None, refused);
    }
    let (method, path) = if ctx.settings.access_log {
        (
            Some(req.method().clone()),
            Some(req.uri().path().to_owned()),
        )
    } else {
        (None, None)
    };
    let resp = forward::forward(req, upgrade, conn, &ctx, h1).await;
    if let (Some(m), Some(p)) = (method, path) {
        // "-" when no instance answered (503, or 502/504 after the attempts).
        let (instance, upstream) = match ctx.served.get() {
            Some(ep) => (&*ep.id, ep.addr.to_string()),
            None => ("-", "-".to_owned()),
        };
        tracing::info!(
            target: "access",
            listener = %listener.name,
            client = %conn.peer,
            method = %m,
            path = %p,
            service = %route.service_name,
            instance = %instance,
            upstream = %upstream,
            request_id = %ctx.request_id.get().and_then(|v| v.to_str().ok()).unwrap_or("-"),
            status = resp.status().as_u16(),
            micros = start.elapsed().as_micros() as u64,
        );
    }
    resp
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
