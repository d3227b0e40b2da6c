//! The admin server's status routes: the page and its assets, `/api/status` and the
//! server-sent-event stream. Everything else goes to the admin handler in `server`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::{Frame, Incoming};

use crate::body::RespBody;
use crate::server::AdminState;

pub type StatusBody = UnsyncBoxBody<Bytes, Infallible>;
/// What the admin server answers with: its own plain responses, or ours.
pub type AdminBody = Either<RespBody, StatusBody>;

const PAGE: &str = include_str!("../../assets/status.html");
const STYLE: &str = include_str!("../../assets/status.css");
const SCRIPT: &str = include_str!("../../assets/status.js");

/// Only our own embedded script and style, and requests back to this origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// SSE comment sent when nothing changed for this long (keeps proxies from timing out).
const KEEPALIVE: Duration = Duration::from_secs(15);

/// Admin request entry point: status routes here, the rest to `server::admin`.
pub async fn admin(
    req: Request<Incoming>,
    st: Arc<AdminState>,
) -> Result<Response<AdminBody>, Infallible> {
    let mut r = match status_route(&req, &st) {
        Some(r) => r.map(Either::Right),
        None => crate::server::admin(req, st).await?.map(Either::Left),
    };
    // Which process answered (two share the port while a self-upgrade is under way).
    static PID: std::sync::OnceLock<HeaderValue> = std::sync::OnceLock::new();
    let pid = PID.get_or_init(|| HeaderValue::from(std::process::id()));
    r.headers_mut().insert("x-balancer-pid", pid.clone());
    Ok(r)
}

fn full(b: impl Into<Bytes>) -> StatusBody {
    Full::new(b.into()).boxed_unsync()
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: StatusBody,
) -> Response<StatusBody> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn status_route(req: &Request<Incoming>, st: &Arc<AdminState>) -> Option<Response<StatusBody>> {
    let path = req.uri().path();
    let known = matches!(
        path,
        "/" | "/status"
            | "/assets/status.css"
            | "/assets/status.js"
            | "/api/status"
            | "/api/status/stream"
    );
    if !known {
        return None;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            full("GET only\n"),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Some(r);
    }
    Some(match path {
        "/" | "/status" => {
            let mut r = respond(StatusCode::OK, "text/html; charset=utf-8", full(PAGE));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            );
            h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
            h.insert(
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            );
            r
        }
        "/assets/status.css" => respond(StatusCode::OK, "text/css; charset=utf-8", full(STYLE)),
        "/assets/status.js" => respond(
            StatusCode::OK,
            "text/javascript; charset=utf-8",
            full(SCRIPT),
        ),
        "/api/status" => {
            let doc = st.status.latest();
            if doc.is_empty() {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    full("status not computed yet\n"),
                )
            } else {
                respond(StatusCode::OK, "application/json", full(doc))
            }
        }
        _ => stream(st),
    })
}

/// `text/event-stream`: the current document at once, then one per change; ends on
/// shutdown.
fn stream(st: &Arc<AdminState>) -> Response<StatusBody> {
    let rx = st.status.subscribe();
    let shutdown = st.shutting_down.clone();
    let first = Some(Bytes::from_static(b"retry: 1000\n\n"));
    let s = futures::stream::unfold(
        (rx, shutdown, first, true),
        |(mut rx, mut shutdown, mut first, mut send_now)| async move {
            if let Some(b) = first.take() {
                return Some((Ok(Frame::data(b)), (rx, shutdown, first, send_now)));
            }
            loop {
                if *shutdown.borrow() {
                    return None;
                }
                if send_now {
                    send_now = false;
                    let doc = rx.borrow_and_update().clone();
                    if !doc.is_empty() {
                        return Some((
                            Ok(Frame::data(sse_event(&doc))),
                            (rx, shutdown, first, send_now),
                        ));
                    }
                }
                let keepalive = tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() {
                            return None;
                        }
                        send_now = true;
                        false
                    }
                    _ = shutdown.wait_for(|s| *s) => return None,
                    _ = tokio::time::sleep(KEEPALIVE) => true,
                };
                if keepalive {
                    return Some((
                        Ok(Frame::data(Bytes::from_static(b": keepalive\n\n"))),
                        (rx, shutdown, first, send_now),
                    ));
                }
            }
        },
    );
    let mut r = respond(
        StatusCode::OK,
        "text/event-stream",
        StreamBody::new(s).boxed_unsync(),
    );
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// One SSE `message` event; the JSON is compact (no newlines), so one `data:` line.
fn sse_event(doc: &Bytes) -> Bytes {
    let mut out = Vec::with_capacity(doc.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(doc);
    out.extend_from_slice(b"\n\n");
    out.into()
}
