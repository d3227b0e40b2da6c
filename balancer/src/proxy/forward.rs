//! `forward`: pick an instance, reuse or open a connection, exchange, retry what may be
//! retried, and turn every failure into an answer.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt as _;

use crate::body::{Lease, RespBody, Tunnel};
use crate::deadline;
use crate::endpoint::{Endpoint, InFlight};
use crate::h1_head;
use crate::header_rules::Answer;
use crate::hop_by_hop;
use crate::outlier;
use crate::select;
use crate::strip_prefix;
use crate::table::{Route, ServiceTable};
use crate::upstream::{UpConn, UpError};

use super::exchange::{ConnectError, Fail, connect, exchange};
use super::forward_h2::{Prepared, forward_h2};
use super::headers::{idempotent, strip_hop_by_hop};
use super::tries::{Tries, no_answer};
use super::{BoxError, ClientBody, ClientUpgrade, ConnInfo, Ctx, H1Client, plain};

pub(super) async fn forward<B>(
    req: &mut Request<B>,
    client_upgrade: ClientUpgrade,
    conn: &ConnInfo,
    ctx: &Ctx<'_>,
    h1: Option<H1Client<'_>>,
) -> Response<RespBody>
where
    B: ClientBody,
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
    let route = ctx.route;
    // The head for the upstream hop, encoded straight from the client's headers. In a
    // block: what only builds it is not kept in this future while it waits.
    let head =
        {
            let origin = h1_head::origin_form(req.uri());
            let stripped: Cow<'_, str>;
            let target: &str = if route.strip_prefix {
                stripped = strip_prefix::strip(&origin, &route.path_prefix);
                &stripped
            } else {
                &origin
            };
            // The request's id, the client's or one made now (`request_id_header`).
            let rid = (s.request_id.as_ref()).map(|n| crate::request_id::of(n.as_str(), headers));
            if let Some(v) = rid
                .as_ref()
                .and_then(|r| HeaderValue::from_bytes(r.as_bytes()).ok())
            {
                let _ = ctx.request_id.set(v);
            }
            let rewrite = (route.strip_prefix || route.request_rules.is_some() || rid.is_some())
                .then(|| h1_head::Rewrite {
                    prefix: route
                        .strip_prefix
                        .then(|| strip_prefix::forwarded(&route.path_prefix)),
                    rules: route.request_rules.as_ref(),
                    request_id: (s.request_id.as_ref())
                        .zip(rid.as_ref().and_then(|r| r.to_add()))
                        .map(|(n, v)| (n.as_str().as_bytes(), v)),
                });
            let mut head = Vec::with_capacity(256 + headers.encoded_len_hint());
            h1_head::encode_request(
                &mut head,
                req.method(),
                target,
                headers,
                &h1_head::Forwarded {
                    add: s.forwarded_headers,
                    peer_ip: &conn.peer_ip,
                    tls: conn.tls,
                    client_cert: conn.client_cert.as_ref(),
                    authority: req.uri().authority().map(|a| a.as_str()),
                    upgrade,
                    chunked,
                    rewrite: rewrite.as_ref(),
                },
            );
            head
        };
    // The version the request names and the instance its sticky cookie names, on a route
    // that reads them (`version_pin`, `sticky`); one branch on the others.
    let want = if route.pin.is_none() && route.sticky.is_none() {
        select::Wanted::default()
    } else {
        wanted(route, headers, svc)
    };
    if let Some(m) = &route.mirror {
        m.maybe_copy(req.method(), has_body || upgrade, &head, || {
            mirror_target(ctx)
        });
    }
    if let Some(opts) = route.upstream.as_ref().filter(|o| o.http2) {
        // Boxed: rare, and its future would otherwise sit in every request's.
        let te_trailers = headers.iter().any(|(n, v)| {
            hop_by_hop::eq_lowercase(n, b"te") && crate::upstream::has_token(v, "trailers")
        });
        let prepared = Prepared {
            head: &head,
            want,
            te_trailers,
            has_body,
            tls: conn.tls,
        };
        return Box::pin(to_h2(req, prepared, upgrade, ctx, svc, opts)).await;
    }
    // Standard methods clone without allocating.
    let method = req.method().clone();
    let body = req.body_mut();
    // An idempotent, body-less request whose connection is reset before any answer (a
    // reused keep-alive connection the upstream closed as we wrote, or a crash) is
    // resent: the head is still in `head`.
    let may_resend = !has_body && idempotent(&method) && !upgrade;

    let response_timeout = route.response_timeout.unwrap_or(s.response_timeout);
    let mut tries = Tries::default();
    // The answer if no attempt succeeds: none made (no instance) is a 503.
    let mut last: Option<StatusCode> = None;
    loop {
        let member = match select::pick(svc, want, &tries.tried, ctx.start) {
            Some(m) => m,
            // None to pick: a service with `max_requests` waits for a slot (rare: boxed).
            None => match crate::queue::wait_boxed(svc, want, &tries.tried, ctx.start).await {
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
                    tracing::debug!(instance = %ep.id, addr = %ep.addr, error = %e, "connect failed");
                    let timed_out = matches!(e, ConnectError::Timeout);
                    if tries.connect_failed(&ep, svc, s, timed_out, &mut last) {
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
                    let from = if reused && tries.none_failed() {
                        ctx.start
                    } else {
                        Instant::now()
                    };
                    let at = tokio::time::Instant::from_std(from + response_timeout);
                    deadline::within_at(t.as_mut(), at, exchanged.as_mut())
                        .await
                        .map_err(|_| ())
                }
                None => tokio::time::timeout(response_timeout, exchanged.as_mut())
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
            Ok(Err(Fail::HeadWrite(e))) => {
                // The head never reached the upstream whole and the body is still unread:
                // the same request goes to another connection, whatever its method.
                last = Some(StatusCode::BAD_GATEWAY);
                if reused {
                    // A pooled connection the upstream closed as we wrote.
                    tracing::debug!(instance = %ep.id, error = %e, "stale pooled connection");
                    if tries.stale_connection(&ep, s) {
                        continue;
                    }
                    break;
                }
                // A new connection reset before it took the head: the instance crashed or
                // closed its listener between the handshake and this write.
                tracing::debug!(instance = %ep.id, error = %e, "new connection reset before the request head");
                tries.instance_failed(&ep, svc, s);
                if tries.may_retry(svc, s) {
                    svc.shared.retries_reset.inc();
                    continue;
                }
                break;
            }
            Ok(Err(Fail::BodyTooLarge)) => {
                return ctx.finish(Some(version), body_refused(true));
            }
            Ok(Err(Fail::ClientBody(e))) => {
                tracing::debug!(error = %e, "client body broke");
                return ctx.finish(Some(version), body_refused(false));
            }
            Ok(Err(e)) => {
                tracing::debug!(instance = %ep.id, error = %e, reused, "upstream failed before answering");
                last = Some(StatusCode::BAD_GATEWAY);
                let closed = matches!(e, Fail::Response(UpError::ClosedBeforeResponse));
                let stale = reused && closed;
                let within = if stale {
                    tries.stale_connection(&ep, s)
                } else {
                    tries.instance_failed(&ep, svc, s);
                    true
                };
                // The budget is asked last: only a retry that will happen takes from it.
                if may_resend && closed && within && (stale || tries.may_retry(svc, s)) {
                    svc.shared.retries_reset.inc();
                    continue;
                }
                break;
            }
        };

        let status = resp.status;
        let elapsed = answered(ctx, &ep, svc, status);
        // A `retry_on` answer: the request goes to another instance if one is left and
        // the budget allows (the answer, unread, goes with its connection); else it is
        // passed on.
        if tries.retry_status(route, may_resend, status, &ep, svc, s) {
            drop((up, in_flight));
            continue;
        }
        let mut headers = resp.headers;
        let switching = status == StatusCode::SWITCHING_PROTOCOLS;
        let sticky = Some((ep.sticky_id, want.instance, conn.tls));
        match (resp.lines, lines_out.as_deref_mut()) {
            (Some(mut l), Some(out)) => {
                if ctx.edits_answers() {
                    ctx.edit_answer(Answer::Lines(&mut l), sticky);
                }
                *out = Some(l);
            }
            _ => {
                strip_hop_by_hop(&mut headers, switching);
                if ctx.edits_answers() {
                    ctx.edit_answer(Answer::Map(&mut headers), sticky);
                }
            }
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
                    last = Some(StatusCode::BAD_GATEWAY);
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
    ctx.finish(None, unanswered(last))
}

/// The answer to a request whose body was refused while it streamed: over the limit
/// (413) or broken (400). The client connection closes after it.
pub(super) fn body_refused(too_large: bool) -> Response<RespBody> {
    if too_large {
        plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large\n",
            true,
        )
    } else {
        plain(StatusCode::BAD_REQUEST, "malformed request body\n", true)
    }
}

/// The answer when no attempt got one: the last attempt's failure (504 for a connect
/// timeout, 503 when every instance stayed at its `max_requests`, else 502), or 503 when
/// there was no instance to try.
pub(super) fn unanswered(last: Option<StatusCode>) -> Response<RespBody> {
    match last {
        Some(StatusCode::GATEWAY_TIMEOUT) => plain(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream connect timed out\n",
            false,
        ),
        Some(StatusCode::SERVICE_UNAVAILABLE) => plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "every instance is at its max_requests\n",
            false,
        ),
        Some(_) => plain(StatusCode::BAD_GATEWAY, "upstream unavailable\n", false),
        None => plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "no backend available\n",
            false,
        ),
    }
}

/// Accounts for an instance's answer (status page, outlier streak, the access log's
/// instance); returns how long the request took to be answered.
pub(super) fn answered(
    ctx: &Ctx<'_>,
    ep: &Arc<Endpoint>,
    svc: &ServiceTable,
    status: StatusCode,
) -> std::time::Duration {
    let s = ctx.settings;
    if s.access_log {
        let _ = ctx.served.set(ep.clone());
    }
    let elapsed = ctx.start.elapsed();
    ep.stats.record_answer(status.as_u16(), elapsed);
    if status.is_server_error() {
        outlier::record_failure(ep, svc, s);
    } else {
        ep.record_success();
    }
    elapsed
}

/// Where a route's `mirror` copies go: its service over HTTP/1.1 (plain or TLS); none for
/// services whose connections speak HTTP/2 or carry a PROXY header (which would have to
/// name a client the copy does not have).
fn mirror_target(ctx: &Ctx<'_>) -> Option<crate::mirror::Target> {
    let opts = ctx.route.upstream.clone();
    if opts.as_ref().is_some_and(|o| o.http2 || o.proxy.is_some()) {
        return None;
    }
    Some(crate::mirror::Target {
        service: ctx.route.service.clone()?,
        opts,
        connect_timeout: ctx.settings.connect_timeout,
        response_timeout: (ctx.route.response_timeout).unwrap_or(ctx.settings.response_timeout),
    })
}

/// `forward` to a service whose instances speak HTTP/2 (see `forward_h2`).
async fn to_h2<B>(
    req: &mut Request<B>,
    prepared: Prepared<'_>,
    upgrade: bool,
    ctx: &Ctx<'_>,
    svc: &ServiceTable,
    opts: &Arc<crate::tcp::UpstreamOpts>,
) -> Response<RespBody>
where
    B: ClientBody,
    B::Error: Into<BoxError>,
{
    if upgrade {
        return ctx.finish(
            None,
            plain(
                StatusCode::NOT_IMPLEMENTED,
                "upgrades are not forwarded to this service's HTTP/2 instances\n",
                false,
            ),
        );
    }
    forward_h2(req, prepared, svc, opts, ctx).await
}

/// What the request asks of the pick on a route with `version_header`/`version_cookie` or
/// `sticky_cookie`. Kept out of `forward`: most routes have neither.
#[inline(never)]
fn wanted(route: &Route, headers: h1_head::ReqHeaders<'_>, svc: &ServiceTable) -> select::Wanted {
    select::Wanted {
        version: (route.pin.as_ref()).and_then(|p| p.version(headers, &svc.versions)),
        instance: (route.sticky.as_ref()).and_then(|s| s.requested(headers)),
    }
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
