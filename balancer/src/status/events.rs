//! Recent operator-relevant events (instance added / removed / drained / evicted, config
//! reloaded, discovery reset), kept in a bounded ring buffer for the status page.
//! Written from the discovery loop and the sampler, never from the request path.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// How many events the page shows (older ones fall off).
pub const CAPACITY: usize = 200;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Monotonic sequence number (lets a client tell new events from seen ones).
    pub seq: u64,
    /// `added`, `removed`, `serving`, `drained`, `evicted`, `pending`, `ejected`,
    /// `recovered`, `split`, `reload`, `reload_failed`, `discovery`.
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    pub message: String,
}

#[derive(Default)]
pub struct EventLog {
    inner: Mutex<(u64, VecDeque<Event>)>,
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl EventLog {
    pub fn push(
        &self,
        kind: &'static str,
        service: Option<&str>,
        instance: Option<&str>,
        message: String,
    ) {
        tracing::debug!(kind, service, instance, %message, "status event");
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0 += 1;
        let seq = g.0;
        if g.1.len() == CAPACITY {
            g.1.pop_front();
        }
        g.1.push_back(Event {
            at_ms: now_unix_ms(),
            seq,
            kind,
            service: service.map(str::to_owned),
            instance: instance.map(str::to_owned),
            message,
        });
    }

    /// Newest first.
    pub fn recent(&self) -> Vec<Event> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.1.iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_is_bounded_and_newest_first() {
        let log = EventLog::default();
        for i in 0..CAPACITY + 5 {
            log.push("added", Some("web"), None, format!("e{i}"));
        }
        let r = log.recent();
        assert_eq!(r.len(), CAPACITY);
        assert_eq!(r[0].message, format!("e{}", CAPACITY + 4));
        assert_eq!(r[0].seq, CAPACITY as u64 + 5);
        assert_eq!(r.last().unwrap().message, "e5");
    }
}
