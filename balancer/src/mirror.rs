//! A route's `mirror`: a share of its `GET`/`HEAD` requests is sent again, in the
//! background, to an instance of one version of the same service (a dark-launched one,
//! typically: deployed with no share of the split), whose answers are read and thrown
//! away. The shadow sees production traffic; clients see nothing of it (Envoy's request
//! mirroring, nginx's `mirror`, Istio's traffic shadowing).
//!
//! Only safe methods without a body are copied: a mirrored `POST` would do its work twice
//! (and its body is streamed once, never kept). The copy is the head the instance of the
//! real request gets (same forwarded headers, rules, request id), plus `X-Mirrored-By:
//! wharf`. It never delays or changes the real request: it starts in its own task, and
//! its failures are counted (`balancer_mirrored_requests_total{service,version,result}`)
//! but do not eject instances or count in the route's answers. At most `max_in_flight`
//! copies of a route are under way at once: a slow or hanging shadow makes the next copies
//! skipped (result `skipped`), not pile up as tasks and sockets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use http_body_util::BodyExt as _;
use prometheus::IntCounterVec;
use serde::Deserialize;

use crate::body::{Lease, RespBody};
use crate::select::{self, Wanted};
use crate::table::ServiceTable;
use crate::tcp::UpstreamOpts;
use crate::upstream::UpConn;

/// `mirror = { version = "v2", percent = 10 }` on a route.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// The version of the route's service that gets the copies.
    pub version: String,
    /// Share of the route's `GET`/`HEAD` requests copied, in percent (0-100, fractions
    /// allowed); default 100.
    #[serde(default = "d_percent")]
    pub percent: f64,
    /// Copies of this route under way at once at most; more are skipped.
    #[serde(default = "d_max_in_flight")]
    pub max_in_flight: u32,
}

fn d_percent() -> f64 {
    100.0
}

fn d_max_in_flight() -> u32 {
    256
}

impl MirrorConfig {
    /// Why the settings cannot work, if they cannot: (key, message).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !(self.percent > 0.0 && self.percent <= 100.0) {
            return Err(("percent", format!("{} is not in (0, 100]", self.percent)));
        }
        if self.version.is_empty() {
            return Err(("version", "names no version".into()));
        }
        if self.max_in_flight == 0 {
            return Err(("max_in_flight", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// A route's mirror, ready for the request path.
pub struct Mirror {
    pub version: Arc<str>,
    pub percent: f64,
    /// A request is copied when a random `u64` falls below this.
    below: u64,
    /// One permit per copy under way (`max_in_flight`).
    in_flight: Arc<tokio::sync::Semaphore>,
    /// `balancer_mirrored_requests_total`.
    counter: IntCounterVec,
}

/// What a copy needs besides the head: where it goes and how long it may take.
pub struct Target {
    pub service: Arc<ServiceTable>,
    pub opts: Option<Arc<UpstreamOpts>>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
}

impl Mirror {
    pub fn new(c: &MirrorConfig, counter: IntCounterVec) -> Self {
        Self {
            version: c.version.as_str().into(),
            percent: c.percent,
            below: (c.percent / 100.0 * u64::MAX as f64) as u64,
            in_flight: Arc::new(tokio::sync::Semaphore::new(c.max_in_flight as usize)),
            counter,
        }
    }

    /// Copies a request with `method` and the instance's `head` when it is one to copy.
    #[cold]
    #[inline(never)]
    pub fn maybe_copy(
        &self,
        method: &Method,
        has_body: bool,
        head: &[u8],
        to: impl FnOnce() -> Option<Target>,
    ) {
        if has_body || !(method == Method::GET || method == Method::HEAD) {
            return;
        }
        if self.below != u64::MAX && select::random_u64() >= self.below {
            return;
        }
        let Some(target) = to() else {
            return;
        };
        let Some(v) = target
            .service
            .versions
            .iter()
            .position(|x| **x == *self.version)
        else {
            self.count(&target.service.name, "no_instance");
            return;
        };
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            self.count(&target.service.name, "skipped");
            return;
        };
        // The head with one more line, before its blank line.
        let mut copy = Vec::with_capacity(head.len() + 24);
        copy.extend_from_slice(&head[..head.len().saturating_sub(2)]);
        copy.extend_from_slice(b"x-mirrored-by: wharf\r\n\r\n");
        let counter = self.counter.clone();
        let (method, version) = (method.clone(), self.version.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let result = send(&target, v, &copy, &method).await;
            counter
                .with_label_values(&[&target.service.name, &version, result])
                .inc();
        });
    }

    fn count(&self, service: &str, result: &str) {
        self.counter
            .with_label_values(&[service, &self.version, result])
            .inc();
    }
}

/// One copy: an instance of version `v`, a pooled or new connection, the head, the answer
/// read to its end (so that the connection goes back to the pool). The result label.
async fn send(t: &Target, v: usize, head: &[u8], method: &Method) -> &'static str {
    let now = Instant::now();
    let want = Wanted {
        version: Some(v),
        instance: None,
    };
    if t.service
        .version_groups
        .get(v)
        .is_none_or(|g| g.members.is_empty())
    {
        return "no_instance";
    }
    let Some(m) = select::pick(&t.service, want, &[], now).filter(|m| m.version == v) else {
        return "no_instance";
    };
    let ep = m.ep.clone();
    let in_flight = ep.start_request();
    let opts = t.opts.as_ref();
    let pooled = ep.checkout(now, |c| c.fits(opts, None));
    let conn = match pooled {
        Some(c) => Ok(c),
        None => tokio::time::timeout(t.connect_timeout, UpConn::open(ep.addr, opts))
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())),
    };
    let Ok(mut up) = conn else {
        return "error";
    };
    let exchange = async {
        up.write_all(head).await.ok()?;
        let resp = up.read_head(method, None).await.ok()?;
        let status = resp.status;
        let mut body = RespBody::upstream(Lease {
            conn: up,
            framing: resp.framing,
            keep_alive: resp.keep_alive,
            in_flight,
            answered: Instant::now(),
        });
        while let Some(frame) = body.frame().await {
            frame.ok()?;
        }
        Some(status)
    };
    match tokio::time::timeout(t.response_timeout, exchange).await {
        Ok(Some(s)) => crate::metrics::CLASSES[crate::metrics::class_of(s.as_u16())],
        Ok(None) => "error",
        Err(_) => "timeout",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        let c = |percent| MirrorConfig {
            version: "v2".into(),
            percent,
            max_in_flight: 1,
        };
        assert!(c(100.0).check().is_ok());
        assert!(c(0.5).check().is_ok());
        assert_eq!(c(0.0).check().unwrap_err().0, "percent");
        assert_eq!(c(150.0).check().unwrap_err().0, "percent");
        assert_eq!(c(f64::NAN).check().unwrap_err().0, "percent");
        let none = MirrorConfig {
            max_in_flight: 0,
            ..c(1.0)
        };
        assert_eq!(none.check().unwrap_err().0, "max_in_flight");
    }
}
