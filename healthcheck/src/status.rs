//! `healthcheck --status`: the catalog's health as the checkers wrote it, one aligned row
//! per instance, for an operator at a terminal (the balancer's status page shows the same
//! marks live).

use std::time::Duration;

use catalog::table::{TextTable, short_duration};
use catalog::{CatalogView, HealthStatus, InstanceState};

/// What a consumer makes of an instance's mark (DESIGN.md): none, or one about an earlier
/// registration of the same id, is pending.
fn verdict(view: &catalog::ServiceView, id: &catalog::InstanceId) -> &'static str {
    let Some(inst) = view.instances.get(id) else {
        return "?";
    };
    match view.health.get(id) {
        Some(h) if h.value.observed_mod_rev < inst.create_revision => "pending",
        Some(h) if h.value.status == HealthStatus::Passing => "passing",
        Some(_) => "critical",
        None => "pending",
    }
}

/// The table, then a summary line and the live checkers. `now_ms`: Unix milliseconds.
pub fn render(view: &CatalogView, now_ms: u64) -> String {
    let mut t = TextTable::new(&[
        "SERVICE", "INSTANCE", "VERSION", "ADDRESS", "STATE", ">WEIGHT", "HEALTH", ">FOR",
        "CHECKER", "OUTPUT",
    ]);
    let (mut passing, mut critical, mut pending) = (0, 0, 0);
    for (name, svc) in &view.services {
        for (id, rec) in &svc.instances {
            let i = &rec.value;
            let v = verdict(svc, id);
            match v {
                "passing" => passing += 1,
                "critical" => critical += 1,
                _ => pending += 1,
            }
            let mark = svc.health.get(id).filter(|_| v != "pending");
            let since = mark
                .map(|h| {
                    short_duration(Duration::from_millis(now_ms.saturating_sub(h.value.since)))
                })
                .unwrap_or_else(|| "-".into());
            let mut output = mark.map(|h| h.value.output.clone()).unwrap_or_default();
            if output.chars().count() > 60 {
                output = output.chars().take(59).chain(['…']).collect();
            }
            t.row(&[
                name.to_string(),
                id.to_string(),
                i.version.to_string(),
                i.socket_addr().to_string(),
                match i.state {
                    InstanceState::Serving => "serving".to_owned(),
                    InstanceState::Draining => "draining".to_owned(),
                },
                i.weight.to_string(),
                v.to_owned(),
                since,
                mark.map(|h| h.value.checker.to_string())
                    .unwrap_or_else(|| "-".into()),
                output,
            ]);
        }
    }
    let mut out = if t.is_empty() {
        "no instances registered\n".to_owned()
    } else {
        t.render()
    };
    out.push_str(&format!(
        "{} instance(s): {passing} passing, {critical} critical, {pending} pending\n",
        passing + critical + pending
    ));
    let checkers: Vec<String> = view.checkers.keys().map(|c| c.to_string()).collect();
    if checkers.is_empty() {
        out.push_str("no live checker: balancers route in panic mode (every serving instance)\n");
    } else {
        out.push_str(&format!(
            "live checkers ({}): {}\n",
            checkers.len(),
            checkers.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog::store::KeyValue;
    use catalog::{Diff, Keyspace, Update};

    #[test]
    fn one_row_per_instance_with_its_verdict() {
        let ks = Keyspace::default();
        let inst = |id: &str, port: u16| {
            serde_json::json!({"id": id, "service": "web", "version": "v1", "node": "n1",
                "addr": "127.0.0.1", "port": port})
            .to_string()
        };
        let put = |key: String, value: String, rev: i64| {
            let kv = KeyValue {
                key: key.into_bytes(),
                value: value.into_bytes(),
                create_revision: rev,
                mod_revision: rev,
                lease: 0,
            };
            Diff::Put(catalog::watch::decode(&ks, &kv).expect("valid entry"))
        };
        let web: catalog::ServiceName = "web".parse().unwrap();
        let mut view = CatalogView::default();
        view.apply(Update {
            revision: 5,
            diffs: vec![
                put(ks.instance(&web, &"n1-a-80".parse().unwrap()), inst("n1-a-80", 8080), 2),
                put(ks.instance(&web, &"n1-b-80".parse().unwrap()), inst("n1-b-80", 8081), 3),
                put(
                    ks.health(&web, &"n1-a-80".parse().unwrap()),
                    r#"{"status":"critical","since":1000,"checker":"hc-1","output":"connect: refused\nagain","observed_mod_rev":2}"#.into(),
                    4,
                ),
                put(ks.checker(&"hc-1".parse().unwrap()), r#"{"version":"t","started":0}"#.into(), 5),
            ],
        });
        let text = render(&view, 61_000);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("SERVICE  INSTANCE"), "{text}");
        assert!(
            lines[1].contains("n1-a-80") && lines[1].contains("critical"),
            "{text}"
        );
        assert!(
            lines[1].contains("1m00s") && lines[1].contains("connect: refused again"),
            "{text}"
        );
        assert!(
            lines[2].contains("n1-b-80") && lines[2].contains("pending"),
            "{text}"
        );
        assert!(
            text.contains("2 instance(s): 0 passing, 1 critical, 1 pending"),
            "{text}"
        );
        assert!(text.contains("live checkers (1): hc-1"), "{text}");
    }
}
