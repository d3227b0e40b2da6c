//! Restart policies (`no | on-failure[:N] | always`) and their capped exponential backoff:
//! 1 s doubling up to a cap (60 s by default), reset after a run that lasted long enough,
//! as Kubernetes does, so that a flapping container never spins.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// When a container that exited is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "policy", content = "max")]
pub enum RestartPolicy {
    #[default]
    No,
    /// After a non-zero exit, at most `max` times (unlimited when `None`).
    OnFailure(Option<u32>),
    Always,
}

impl RestartPolicy {
    /// Whether a run that ended with `code`, after `restarts` restarts so far, is restarted.
    pub fn should_restart(&self, code: i32, restarts: u32) -> bool {
        match self {
            RestartPolicy::No => false,
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure(max) => code != 0 && max.is_none_or(|m| restarts < m),
        }
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestartPolicy::No => f.write_str("no"),
            RestartPolicy::Always => f.write_str("always"),
            RestartPolicy::OnFailure(None) => f.write_str("on-failure"),
            RestartPolicy::OnFailure(Some(n)) => write!(f, "on-failure:{n}"),
        }
    }
}

impl FromStr for RestartPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "no" => Ok(Self::No),
            "always" => Ok(Self::Always),
            "on-failure" => Ok(Self::OnFailure(None)),
            _ => match s.strip_prefix("on-failure:") {
                Some(n) => n
                    .parse()
                    .map(|n| Self::OnFailure(Some(n)))
                    .map_err(|_| format!("restart policy {s:?}: bad count {n:?}")),
                None => Err(format!(
                    "restart policy {s:?}: expected no, on-failure[:N] or always"
                )),
            },
        }
    }
}

/// Capped exponential backoff between restarts.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    cap: Duration,
    /// A run at least this long resets the delay.
    reset_after: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, cap: Duration, reset_after: Duration) -> Self {
        Self {
            initial,
            cap,
            reset_after,
            next: initial,
        }
    }

    /// The delay before the next start, given how long the last run lasted.
    pub fn after_run(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= self.reset_after {
            self.next = self.initial;
        }
        let delay = self.next.min(self.cap);
        self.next = (self.next * 2).min(self.cap);
        delay
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(
            Duration::from_secs(1),
            Duration::from_secs(60),
            Duration::from_secs(60),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_policies() {
        for s in ["no", "always", "on-failure", "on-failure:3"] {
            assert_eq!(s.parse::<RestartPolicy>().unwrap().to_string(), s);
        }
        for bad in ["", "sometimes", "on-failure:x", "on-failure:-1"] {
            assert!(bad.parse::<RestartPolicy>().is_err(), "{bad}");
        }
    }

    #[test]
    fn decides_restarts() {
        let p: RestartPolicy = "on-failure:2".parse().unwrap();
        assert!(!p.should_restart(0, 0));
        assert!(p.should_restart(1, 0) && p.should_restart(137, 1));
        assert!(!p.should_restart(1, 2));
        assert!(RestartPolicy::Always.should_restart(0, 100));
        assert!(!RestartPolicy::No.should_restart(1, 0));
    }

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let s = Duration::from_secs;
        let mut b = Backoff::new(s(1), s(8), s(60));
        let delays: Vec<_> = (0..6).map(|_| b.after_run(s(0))).collect();
        assert_eq!(delays, vec![s(1), s(2), s(4), s(8), s(8), s(8)]);
        assert_eq!(b.after_run(s(61)), s(1));
    }
}
