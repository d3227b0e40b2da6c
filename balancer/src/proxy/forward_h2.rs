//! `forward_h2`: `forward` for a service whose instances speak HTTP/2 (`http2 = true`,
//! gRPC): the same pick, retries, outlier accounting and answer edits, over the instance's
//! shared HTTP/2 connection (`upstream_h2`) instead of a pooled HTTP/1 one.
//!
//! Bodies: an HTTP/2 client's request body is handed to the upstream stream whole, so
//! both directions stream at once (gRPC bidirectional calls) and trailers pass both ways.
//! The own HTTP/1 server's body borrows the client connection; it is pumped into the
//! stream while the answer is awaited, and an answer that comes before the body ended
//! cuts it off (the client connection then closes, as for HTTP/1 instances). Trailers of
//! an answer reach HTTP/2 clients only (HTTP/1 answers are not sent with trailers).

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use http_body_util::channel::{Channel, Sender};

use crate::body::{H2Answer, RespBody};
use crate::endpoint::Endpoint;
use crate::header_rules::Answer;
use crate::select;
use crate::table::ServiceTable;
use crate::tcp::UpstreamOpts;
use crate::upstream_h2::{self, H2Body, empty};

use super::forward::{answered, body_refused, unanswered};
use super::headers::{idempotent, strip_hop_by_hop};
use super::tries::{Tries, no_answer};
use super::{BoxError, ClientBody, Ctx, plain};

/// What `forward` hands over: the request as it would go to an HTTP/1 instance.
pub(super) struct Prepared<'a> {
    /// The encoded HTTP/1 head (request line with the target to send, header lines).
    pub head: &'a [u8],
    pub want: select::Wanted,
    /// The client sent `TE: trailers` (gRPC clients do; HTTP/1 heads drop `TE`).
    pub te_trailers: bool,
    pub has_body: bool,
    /// The client connection is TLS (the sticky cookie's `Secure` flag).
    pub tls: bool,
}

pub(super) async fn forward_h2<B>(
    req: &mut Request<B>,
    p: Prepared<'_>,
    svc: &ServiceTable,
    opts: &Arc<UpstreamOpts>,
    ctx: &Ctx<'_>,
) -> Response<RespBody>
where
    B: ClientBody,
    B::Error: Into<BoxError>,
{
    let s = ctx.settings;
    let Ok((target, mut headers, authority)) = upstream_h2::parts_of(p.head) else {
        return ctx.finish(None, plain(StatusCode::BAD_REQUEST, "bad request\n", true));
    };
    if p.te_trailers {
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
    let method = req.method().clone();
    let client_version = req.version();
    let scheme = if opts.tls.is_some() { "https" } else { "http" };
    let may_resend = !p.has_body && idempotent(&method);
    // The client's body: handed over (HTTP/2 client), pumped (HTTP/1 client), or none.
    let (body, mut pump): (H2Body, Option<Sender<Bytes, BoxError>>) =
        match req.body_mut().take_owned() {
            Some(owned) => (upstream_h2::boxed(owned, s.max_body_bytes), None),
            None if p.has_body => {
                let (tx, rx) = Channel::<Bytes, BoxError>::new(1);
                (rx.boxed(), Some(tx))
            }
            None => (empty(), None),
        };
    // Taken by each attempt; back when a request did not leave, or a fresh empty one.
    let mut body = Some(body);
    let response_timeout = ctx.route.response_timeout.unwrap_or(s.response_timeout);
    let mut tries = Tries::default();
    let mut last: Option<StatusCode> = None;
    loop {
        let member = match select::pick(svc, p.want, &tries.tried, ctx.start) {
            Some(m) => m,
            // As in `forward`: a service with `max_requests` waits for a slot.
            None => match crate::queue::wait_boxed(svc, p.want, &tries.tried, ctx.start).await {
                Ok(m) => m,
                Err(no_slot) => {
                    last = no_slot.answer().or(last);
                    break;
                }
            },
        };
        let ep = member.ep.clone();
        let version = member.version;
        let in_flight = ep.start_request();
        // The connection, or (rarely) its opening under the connect timeout.
        let open = match ep.h2_checkout(opts) {
            Some(send) => Ok(Ok(send)),
            None => tokio::time::timeout(s.connect_timeout, ep.h2_open(opts)).await,
        };
        let mut send = match open {
            Ok(Ok(send)) => send,
            failed => {
                let timed_out = failed.is_err();
                tracing::debug!(instance = %ep.id, addr = %ep.addr, timed_out, "HTTP/2 connect failed");
                if tries.connect_failed(&ep, svc, s, timed_out, &mut last) {
                    continue;
                }
                break;
            }
        };
        let Some(b) = body.take() else {
            // The body went with an earlier attempt: nothing left to send again.
            break;
        };
        let Ok(upstream_req) = request(&method, scheme, &authority, &ep, &target, &headers, b)
        else {
            return ctx.finish(None, plain(StatusCode::BAD_REQUEST, "bad request\n", true));
        };
        let sent = tokio::time::timeout(
            response_timeout,
            exchange(
                &mut send,
                upstream_req,
                &mut pump,
                req.body_mut(),
                s.max_body_bytes,
            ),
        )
        .await;
        let resp = match sent {
            Err(_) => {
                no_answer(&ep, svc, s);
                abort(pump.take());
                return ctx.finish(
                    Some(version),
                    plain(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n", false),
                );
            }
            Ok(Ok(resp)) => resp,
            Ok(Err(Fail::NotSent(back, e))) => {
                // The connection was gone before the request left: another one (the
                // instance restarted, or closed an idle connection) may take it.
                tracing::debug!(instance = %ep.id, error = %e, "HTTP/2 connection closed before the request");
                body = back.map(|r| r.into_body());
                last = Some(StatusCode::BAD_GATEWAY);
                if tries.stale_connection(&ep, s) {
                    continue;
                }
                break;
            }
            Ok(Err(Fail::BodyTooLarge)) => {
                abort(pump.take());
                return ctx.finish(Some(version), body_refused(true));
            }
            Ok(Err(Fail::ClientBody(e))) => {
                tracing::debug!(error = %e, "client body broke");
                abort(pump.take());
                return ctx.finish(Some(version), body_refused(false));
            }
            Ok(Err(Fail::Upstream(e))) if upstream_h2::refused(&e) && !p.has_body => {
                // Not processed, and nothing of it is gone: sent again (another pick; the
                // instance is not at fault, and no budget is spent).
                tracing::debug!(instance = %ep.id, "HTTP/2 stream refused by the instance");
                last = Some(StatusCode::BAD_GATEWAY);
                if tries.resend_unprocessed(s) {
                    body = Some(empty());
                    continue;
                }
                break;
            }
            Ok(Err(Fail::Upstream(e))) => {
                tracing::debug!(instance = %ep.id, error = %e, "HTTP/2 upstream failed before answering");
                last = Some(StatusCode::BAD_GATEWAY);
                tries.instance_failed(&ep, svc, s);
                if may_resend && tries.may_retry(svc, s) {
                    svc.shared.retries_reset.inc();
                    body = Some(empty());
                    continue;
                }
                break;
            }
        };
        // The answer came: a request body not pumped to its end is cut off (see above).
        abort(pump.take());
        let status = resp.status();
        let elapsed = answered(ctx, &ep, svc, status);
        if tries.retry_status(ctx.route, may_resend, status, &ep, svc, s) {
            drop((resp, in_flight));
            body = Some(empty());
            continue;
        }
        let (mut parts, incoming) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        if ctx.edits_answers() {
            let sticky = Some((ep.sticky_id, p.want.instance, p.tls));
            ctx.edit_answer(Answer::Map(&mut parts.headers), sticky);
        }
        let mut r = Response::new(RespBody::H2(Some(H2Answer {
            body: incoming,
            _in_flight: in_flight,
        })));
        *r.status_mut() = status;
        *r.version_mut() = client_version;
        *r.headers_mut() = parts.headers;
        ctx.record(Some(version), status, elapsed);
        return r;
    }
    abort(pump.take());
    ctx.finish(None, unanswered(last))
}

/// The upstream request: the target and header lines of the HTTP/1 head, the authority
/// of its `Host` line (else the instance's address).
fn request(
    method: &Method,
    scheme: &str,
    authority: &Option<String>,
    ep: &Endpoint,
    target: &str,
    headers: &HeaderMap,
    body: H2Body,
) -> Result<Request<H2Body>, http::Error> {
    let authority = match authority {
        Some(a) => a.clone(),
        None => ep.addr.to_string(),
    };
    let uri = Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(target)
        .build()?;
    let mut r = Request::new(body);
    *r.method_mut() = method.clone();
    *r.uri_mut() = uri;
    *r.version_mut() = Version::HTTP_2;
    *r.headers_mut() = headers.clone();
    Ok(r)
}

#[derive(Debug, thiserror::Error)]
enum Fail {
    /// The request never left (the connection was closed): it comes back whole.
    #[error("not sent: {1}")]
    NotSent(Option<Box<Request<H2Body>>>, hyper::Error),
    #[error("request body exceeds the limit")]
    BodyTooLarge,
    #[error("client body: {0}")]
    ClientBody(BoxError),
    #[error("{0}")]
    Upstream(hyper::Error),
}

/// Sends the request and, for an HTTP/1 client, pumps its body into the stream until the
/// answer's head arrives. A body pumped to its end leaves `pump` empty (the stream's body
/// then ends cleanly); one still in `pump` is unfinished.
async fn exchange<B>(
    send: &mut hyper::client::conn::http2::SendRequest<H2Body>,
    req: Request<H2Body>,
    pump: &mut Option<Sender<Bytes, BoxError>>,
    client_body: &mut B,
    limit: u64,
) -> Result<Response<hyper::body::Incoming>, Fail>
where
    B: ClientBody,
    B::Error: Into<BoxError>,
{
    let answer = send.try_send_request(req);
    tokio::pin!(answer);
    let result = match pump.as_mut() {
        None => answer.await,
        Some(tx) => {
            let mut pumped = false;
            let result = {
                let pumping = pump_body(client_body, tx, limit);
                tokio::pin!(pumping);
                loop {
                    tokio::select! {
                        biased;
                        r = &mut answer => break r,
                        r = &mut pumping, if !pumped => {
                            pumped = true;
                            r?;
                        }
                    }
                }
            };
            if pumped {
                *pump = None;
            }
            result
        }
    };
    result.map_err(|mut e| match e.take_message() {
        Some(req) => Fail::NotSent(Some(Box::new(req)), e.into_error()),
        None => Fail::Upstream(e.into_error()),
    })
}

/// Moves an HTTP/1 client's body into the upstream stream, frame by frame.
async fn pump_body<B>(
    body: &mut B,
    tx: &mut Sender<Bytes, BoxError>,
    limit: u64,
) -> Result<(), Fail>
where
    B: ClientBody,
    B::Error: Into<BoxError>,
{
    let mut seen = 0u64;
    while !body.is_end_stream() {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame.map_err(|e| Fail::ClientBody(e.into()))?;
        if let Some(data) = frame.data_ref() {
            seen += data.len() as u64;
            if seen > limit {
                return Err(Fail::BodyTooLarge);
            }
        }
        if tx.send(frame).await.is_err() {
            // The stream is gone (the instance answered or reset it): stop reading.
            break;
        }
    }
    Ok(())
}

/// Ends an unfinished pumped body with an error, so that the instance sees the request
/// reset rather than a body that looks complete.
fn abort(tx: Option<Sender<Bytes, BoxError>>) {
    if let Some(tx) = tx {
        tx.abort("request body cut off".into());
    }
}
