//! The rise/fall state machine of one instance: pure logic, no I/O.
//!
//! Like HAProxy and Consul: `rise` passing probes in a row make an instance passing, `fall`
//! failing probes in a row make it critical. A new instance starts pending (no mark, no
//! traffic) and leaves that state only through one of the two thresholds.

use std::fmt;

/// What the checker currently believes about one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// No verdict yet: the instance gets no mark, hence no traffic.
    Pending,
    Passing,
    Critical,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Passing => "passing",
            Status::Critical => "critical",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one probe result did to the tracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing the mark needs to know about.
    Unchanged,
    /// The status crossed a threshold.
    Changed { from: Status, to: Status },
    /// First probe agreeing with a status taken over from an earlier verdict (another
    /// checker's, or this checker's before a restart): the verdict may now be re-asserted.
    Confirmed,
}

/// Consecutive-result counters and the status they lead to.
#[derive(Debug, Clone)]
pub struct Tracker {
    status: Status,
    passes: u32,
    fails: u32,
    rise: u32,
    fall: u32,
    confirmed: bool,
}

impl Tracker {
    /// A tracker starting at `status`. A non-pending start is a verdict taken over from
    /// elsewhere and stays unconfirmed until a probe agrees with it.
    pub fn new(status: Status, rise: u32, fall: u32) -> Self {
        Self {
            status,
            passes: 0,
            fails: 0,
            rise: rise.max(1),
            fall: fall.max(1),
            confirmed: status == Status::Pending,
        }
    }

    pub fn status(&self) -> Status {
        self.status
    }

    pub fn confirmed(&self) -> bool {
        self.confirmed
    }

    /// Probes in a row with the latest result.
    pub fn consecutive(&self) -> u32 {
        self.passes.max(self.fails)
    }

    /// Records one probe result.
    pub fn record(&mut self, passed: bool) -> Step {
        if passed {
            self.passes = self.passes.saturating_add(1);
            self.fails = 0;
        } else {
            self.fails = self.fails.saturating_add(1);
            self.passes = 0;
        }
        let target = match (self.status, passed) {
            (Status::Passing, true) | (Status::Critical, false) => {
                if self.confirmed {
                    return Step::Unchanged;
                }
                self.confirmed = true;
                return Step::Confirmed;
            }
            (Status::Pending | Status::Critical, true) if self.passes >= self.rise => {
                Status::Passing
            }
            (Status::Pending | Status::Passing, false) if self.fails >= self.fall => {
                Status::Critical
            }
            _ => return Step::Unchanged,
        };
        let from = self.status;
        self.status = target;
        self.confirmed = true;
        Step::Changed { from, to: target }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(t: &mut Tracker, results: &[bool]) -> Vec<Step> {
        results.iter().map(|r| t.record(*r)).collect()
    }

    #[test]
    fn pending_needs_rise_passes_in_a_row() {
        let mut t = Tracker::new(Status::Pending, 3, 3);
        let steps = run(&mut t, &[true, true, false, true, true]);
        assert!(steps.iter().all(|s| *s == Step::Unchanged));
        assert_eq!(t.status(), Status::Pending);
        assert_eq!(
            t.record(true),
            Step::Changed {
                from: Status::Pending,
                to: Status::Passing
            }
        );
        assert_eq!(t.consecutive(), 3);
    }

    #[test]
    fn exactly_fall_then_exactly_rise() {
        let mut t = Tracker::new(Status::Pending, 2, 3);
        run(&mut t, &[true, true]);
        assert_eq!(t.status(), Status::Passing);
        assert_eq!(run(&mut t, &[false, false])[1], Step::Unchanged);
        assert_eq!(t.status(), Status::Passing);
        assert!(matches!(
            t.record(false),
            Step::Changed {
                to: Status::Critical,
                ..
            }
        ));
        assert_eq!(t.record(true), Step::Unchanged);
        assert!(matches!(
            t.record(true),
            Step::Changed {
                to: Status::Passing,
                ..
            }
        ));
    }

    #[test]
    fn pending_becomes_critical_after_fall_failures() {
        let mut t = Tracker::new(Status::Pending, 2, 2);
        assert_eq!(t.record(false), Step::Unchanged);
        assert!(matches!(
            t.record(false),
            Step::Changed {
                from: Status::Pending,
                to: Status::Critical
            }
        ));
    }

    #[test]
    fn taken_over_verdict_waits_for_an_agreeing_probe() {
        let mut t = Tracker::new(Status::Passing, 2, 3);
        assert!(!t.confirmed());
        assert_eq!(t.record(false), Step::Unchanged);
        assert_eq!(t.record(true), Step::Confirmed);
        assert_eq!(t.record(true), Step::Unchanged);
        let mut t = Tracker::new(Status::Passing, 2, 2);
        run(&mut t, &[false]);
        assert!(matches!(
            t.record(false),
            Step::Changed {
                to: Status::Critical,
                ..
            }
        ));
        assert!(t.confirmed());
    }

    #[test]
    fn zero_thresholds_mean_one() {
        let mut t = Tracker::new(Status::Pending, 0, 0);
        assert!(matches!(
            t.record(true),
            Step::Changed {
                to: Status::Passing,
                ..
            }
        ));
        assert!(matches!(
            t.record(false),
            Step::Changed {
                to: Status::Critical,
                ..
            }
        ));
    }
}
