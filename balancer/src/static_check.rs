//! Active health checks of static services (`[service.check]`: HAProxy's `check` on a
//! `server` line), for users who run the balancer with no etcd and so no `healthcheck`.
//! Services found in etcd are checked by `healthcheck`, whose marks the table builder
//! reads; this module gives static endpoints the same kind of verdict.
//!
//! One task per checked endpoint probes it every `interval`: a TCP connect, or with `path`
//! a `GET` answered 2xx (HTTP/1.1, or HTTP/2 for an `http2` service), over the service's
//! own way in (PROXY header, TLS: the `upstream_io::open` every request uses). `fall` failures in a row take the endpoint out
//! of the table, `rise` successes bring it back; each flip asks the run loop for a table
//! rebuild, which treats a failing endpoint like a critical etcd instance (retired: idle
//! connections closed, in-flight requests finish; all of a service failing → panic mode,
//! every endpoint routed). The state lives here, not in the `Endpoint`, because a failing
//! endpoint leaves the table and its `Endpoint` goes; the task ends when the configuration
//! drops its endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::mpsc;

use crate::tcp::UpstreamOpts;
use crate::upstream::UpConn;

/// `[service.check]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticCheck {
    /// `GET <path>` over HTTP/1.1, 2xx passes; absent: a TCP connect.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default = "d_interval", with = "catalog::model::duration_str")]
    pub interval: Duration,
    #[serde(default = "d_timeout", with = "catalog::model::duration_str")]
    pub timeout: Duration,
    /// Successes in a row that bring a failing endpoint back.
    #[serde(default = "d_rise")]
    pub rise: u32,
    /// Failures in a row that take a passing endpoint out.
    #[serde(default = "d_fall")]
    pub fall: u32,
}

fn d_interval() -> Duration {
    Duration::from_secs(2)
}
fn d_timeout() -> Duration {
    Duration::from_secs(1)
}
fn d_rise() -> u32 {
    2
}
fn d_fall() -> u32 {
    3
}

impl StaticCheck {
    /// Why the settings cannot work, if they cannot: (key, message).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.interval < Duration::from_millis(10) {
            return Err(("interval", "must be at least 10ms".into()));
        }
        if self.timeout.is_zero() {
            return Err(("timeout", "must be more than 0".into()));
        }
        if self.rise == 0 || self.fall == 0 {
            let key = if self.rise == 0 { "rise" } else { "fall" };
            return Err((key, "must be at least 1".into()));
        }
        if let Some(p) = &self.path
            && (!p.starts_with('/') || p.bytes().any(|b| b <= b' ' || b == 0x7f))
        {
            return Err((
                "path",
                format!("{p:?} is not an absolute path without spaces"),
            ));
        }
        Ok(())
    }
}

/// One checked endpoint: what to probe, and the verdict so far.
pub struct CheckState {
    pub service: Arc<str>,
    pub addr: SocketAddr,
    spec: StaticCheck,
    opts: Option<Arc<UpstreamOpts>>,
    /// Passing. A new endpoint starts passing (as HAProxy's servers start up): the
    /// balancer does not refuse traffic while it has not looked yet.
    up: AtomicBool,
}

impl CheckState {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
}

/// The checks of the configured static endpoints, kept by the table builder across
/// rebuilds while an endpoint's check settings stay.
#[derive(Default)]
pub struct Checks {
    by_endpoint: HashMap<(Arc<str>, SocketAddr), Arc<CheckState>>,
    /// Created since the run loop last took them: their tasks are not running yet.
    new: Vec<Arc<CheckState>>,
}

impl Checks {
    /// The check of `addr` in `service` under `spec` and upstream options `opts`: the one
    /// it had if neither changed, else a new one (passing).
    pub fn state(
        &mut self,
        service: &Arc<str>,
        addr: SocketAddr,
        spec: &StaticCheck,
        opts: Option<&Arc<UpstreamOpts>>,
    ) -> Arc<CheckState> {
        let key = (service.clone(), addr);
        if let Some(s) = self.by_endpoint.get(&key)
            && &s.spec == spec
            && same_opts(s.opts.as_ref(), opts)
        {
            return s.clone();
        }
        let s = Arc::new(CheckState {
            service: service.clone(),
            addr,
            spec: spec.clone(),
            opts: opts.cloned(),
            up: AtomicBool::new(true),
        });
        self.by_endpoint.insert(key, s.clone());
        self.new.push(s.clone());
        s
    }

    /// Keeps the checks of the endpoints in `keep` only (the others' tasks end).
    pub fn retain(&mut self, keep: &std::collections::HashSet<(Arc<str>, SocketAddr)>) {
        self.by_endpoint.retain(|k, _| keep.contains(k));
    }

    /// The checks whose tasks must be started.
    pub fn take_new(&mut self) -> Vec<Arc<CheckState>> {
        std::mem::take(&mut self.new)
    }
}

fn same_opts(a: Option<&Arc<UpstreamOpts>>, b: Option<&Arc<UpstreamOpts>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

/// Starts the tasks of the checks `builder` created since the last call.
pub fn spawn_new(builder: &mut crate::builder::TableBuilder, flipped: &mpsc::UnboundedSender<()>) {
    for state in builder.take_new_checks() {
        spawn(state, flipped.clone());
    }
}

/// Runs a check until its state is dropped; `flipped` hears of every change of verdict.
pub fn spawn(state: Arc<CheckState>, flipped: mpsc::UnboundedSender<()>) {
    let weak = Arc::downgrade(&state);
    let spec = state.spec.clone();
    drop(state);
    tokio::spawn(run(weak, spec, flipped));
}

async fn run(weak: Weak<CheckState>, spec: StaticCheck, flipped: mpsc::UnboundedSender<()>) {
    let mut streak = 0u32;
    let mut ticker = tokio::time::interval(spec.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(state) = weak.upgrade() else {
            return;
        };
        let outcome = tokio::time::timeout(spec.timeout, probe(&state))
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
        let up = state.is_up();
        // A result that agrees with the verdict resets the streak against it.
        if outcome.is_ok() == up {
            streak = 0;
            continue;
        }
        streak += 1;
        if streak < if up { spec.fall } else { spec.rise } {
            continue;
        }
        streak = 0;
        state.up.store(!up, Ordering::Relaxed);
        match &outcome {
            Ok(()) => {
                tracing::info!(service = %state.service, addr = %state.addr, "static endpoint passes its check again")
            }
            Err(e) => {
                tracing::warn!(service = %state.service, addr = %state.addr, error = %e, "static endpoint failed its check; out of the table")
            }
        }
        if flipped.send(()).is_err() {
            return;
        }
    }
}

/// One probe: connect (PROXY header and TLS as the service's requests), then for an HTTP
/// check a `GET` whose answer must be 2xx (its head read by the request path's parser).
async fn probe(s: &CheckState) -> Result<(), String> {
    if let (Some(o), Some(path)) = (s.opts.as_ref().filter(|o| o.http2), &s.spec.path) {
        return probe_h2(s.addr, o, path).await;
    }
    let mut up = UpConn::open(s.addr, s.opts.as_ref())
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let Some(path) = &s.spec.path else {
        return Ok(());
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: wharf-balancer-check\r\nConnection: close\r\n\r\n",
        s.addr
    );
    up.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let head = up
        .read_head(&http::Method::GET, None)
        .await
        .map_err(|e| format!("answer: {e}"))?;
    if head.status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {}", head.status))
    }
}

/// An HTTP check of an `http2` service: a `GET` on a connection of its own (not the
/// endpoint's shared one, which the check must not keep alive), 2xx passes.
async fn probe_h2(addr: SocketAddr, opts: &Arc<UpstreamOpts>, path: &str) -> Result<(), String> {
    let mut c = crate::upstream_h2::open(addr, opts)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let scheme = if opts.tls.is_some() { "https" } else { "http" };
    let req = http::Request::get(format!("{scheme}://{addr}{path}"))
        .header(http::header::USER_AGENT, "wharf-balancer-check")
        .body(crate::upstream_h2::empty())
        .map_err(|e| format!("request: {e}"))?;
    let resp = c
        .send
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP/2: {e}"))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("answered {}", resp.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        let ok: StaticCheck = toml::from_str("").unwrap();
        assert!(ok.check().is_ok());
        assert_eq!((ok.rise, ok.fall), (2, 3));
        let bad = |t: &str| {
            toml::from_str::<StaticCheck>(t)
                .unwrap()
                .check()
                .unwrap_err()
                .0
        };
        assert_eq!(bad("interval = \"1ms\""), "interval");
        assert_eq!(bad("rise = 0"), "rise");
        assert_eq!(bad("fall = 0"), "fall");
        assert_eq!(bad("path = \"health\""), "path");
        assert_eq!(bad("path = \"/a b\""), "path");
    }

    #[test]
    fn a_state_is_kept_while_its_settings_stay() {
        let mut c = Checks::default();
        let svc: Arc<str> = "web".into();
        let addr: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let spec: StaticCheck = toml::from_str("").unwrap();
        let a = c.state(&svc, addr, &spec, None);
        assert!(Arc::ptr_eq(&a, &c.state(&svc, addr, &spec, None)));
        assert_eq!(c.take_new().len(), 1);
        let other = StaticCheck {
            rise: 5,
            ..spec.clone()
        };
        assert!(!Arc::ptr_eq(&a, &c.state(&svc, addr, &other, None)));
        c.retain(&Default::default());
        assert!(c.by_endpoint.is_empty());
    }
}
