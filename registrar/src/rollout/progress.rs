//! What the operator sees: one human line per event, or one JSON object per line with
//! `--json` (`{"event": "...", ...}`) for machines.

use std::time::Instant;

use serde_json::{Value, json};

use super::gate::Observation;

pub struct Progress {
    json: bool,
    start: Instant,
}

impl Progress {
    pub fn new(json: bool) -> Self {
        Self {
            json,
            start: Instant::now(),
        }
    }

    /// Emits an event: `human` for people, `fields` (plus `event` and elapsed seconds) as JSON.
    pub fn emit(&self, event: &str, human: impl FnOnce() -> String, fields: Value) {
        let elapsed = self.start.elapsed().as_secs_f64();
        if self.json {
            let mut obj = json!({"event": event, "elapsed_s": (elapsed * 10.0).round() / 10.0});
            if let (Some(o), Value::Object(f)) = (obj.as_object_mut(), fields) {
                o.extend(f);
            }
            println!("{obj}");
        } else {
            println!("[{elapsed:6.1}s] {}", human());
        }
    }

    /// A live or final gate window.
    pub fn window(&self, event: &str, label: &str, new: &str, obs: &Observation) {
        let ms = |v: Option<f64>| {
            v.map(|v| format!("{v:.1} ms"))
                .unwrap_or_else(|| "-".into())
        };
        self.emit(
            event,
            || {
                format!(
                    "{label}: {new} {} req, {:.2} % 5xx, p99 {} | old {} req, {:.2} % 5xx, p99 {}",
                    obs.new_requests,
                    obs.new_error_rate * 100.0,
                    ms(obs.new_p99_ms),
                    obs.old_requests,
                    obs.old_error_rate * 100.0,
                    ms(obs.old_p99_ms),
                )
            },
            json!({"label": label, "window": obs}),
        );
    }
}
