//! The status page, its JSON API and its live stream, against the real balancer binary
//! fed by a real etcd and real HTTP backends; the page itself in headless Chromium.

#[path = "common/chromium.rs"]
mod chromium;
mod common;

use std::time::Duration;

use anyhow::{Context, Result};
use catalog::{EtcdStore, Keyspace, Store};
use common::*;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use wharf_tests::{EtcdServer, eventually};

/// Health output of the critical instance: markup that must show as text, never run.
const HOSTILE: &str = r#"<img src=x onerror="document.body.dataset.pwned=1"><b id="pwn">boom</b>"#;

fn lb_config(etcd: &EtcdServer) -> String {
    format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"

[discovery.etcd]
endpoints = ["{}"]
dial_timeout = "1s"
request_timeout = "2s"

[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
  [[listener.route]]
  service = "web"
"#,
        etcd.endpoint()
    )
}

struct Fleet {
    store: EtcdStore,
    ks: Keyspace,
}

impl Fleet {
    async fn new(etcd: &EtcdServer) -> Result<Self> {
        let f = Self {
            store: etcd.store().await?,
            ks: Keyspace::default(),
        };
        f.store
            .put(
                &f.ks.checker(&"c1".parse()?),
                br#"{"version":"test","started":0}"#.to_vec(),
                None,
            )
            .await?;
        Ok(f)
    }

    async fn register(&self, id: &str, version: &str, b: &Backend, state: &str) -> Result<i64> {
        let v = json!({
            "id": id, "service": "web", "version": version, "node": "n1",
            "addr": "127.0.0.1", "port": b.addr.port(), "state": state,
        });
        Ok(self
            .store
            .put(
                &self.ks.instance(&"web".parse()?, &id.parse()?),
                v.to_string().into_bytes(),
                None,
            )
            .await?)
    }

    async fn health(&self, id: &str, status: &str, output: &str, rev: i64) -> Result<()> {
        let v = json!({
            "status": status, "since": 1_700_000_000_000u64, "checker": "c1",
            "output": output, "observed_mod_rev": rev,
        });
        self.store
            .put(
                &self.ks.health(&"web".parse()?, &id.parse()?),
                v.to_string().into_bytes(),
                None,
            )
            .await?;
        Ok(())
    }

    async fn split(&self, split: Value) -> Result<()> {
        self.store
            .put(
                &self.ks.config(&"web".parse()?),
                json!({ "split": split }).to_string().into_bytes(),
                None,
            )
            .await?;
        Ok(())
    }

    /// a (v1) and b (v2) serving, p pending, c critical with hostile output, f (v1)
    /// serving but answering 500.
    async fn populate(&self, bs: &Backends) -> Result<()> {
        for (id, v, b) in [
            ("n1-a-80", "v1", &bs.a),
            ("n1-b-80", "v2", &bs.b),
            ("n1-f-80", "v1", &bs.f),
        ] {
            let rev = self.register(id, v, b, "serving").await?;
            self.health(id, "passing", "HTTP 200 OK", rev).await?;
        }
        self.register("n1-p-80", "v2", &bs.p, "serving").await?;
        let rev = self.register("n1-c-80", "v1", &bs.c, "serving").await?;
        self.health("n1-c-80", "critical", HOSTILE, rev).await?;
        self.split(json!({"v1": 75, "v2": 25})).await
    }
}

struct Backends {
    a: Backend,
    b: Backend,
    f: Backend,
    p: Backend,
    c: Backend,
}

impl Backends {
    async fn start() -> Result<Self> {
        Ok(Self {
            a: Backend::start("a").await?,
            b: Backend::start("b").await?,
            f: Backend::start("fail").await?,
            p: Backend::start("p").await?,
            c: Backend::start("c").await?,
        })
    }
}

async fn status(lb: &Lb) -> Result<Value> {
    let url = format!("http://127.0.0.1:{}/api/status", lb.admin);
    let (code, body) = get_with(&client(), &url).await?;
    anyhow::ensure!(code.is_success(), "{url}: {code} {body}");
    Ok(serde_json::from_str(&body)?)
}

fn instance<'a>(st: &'a Value, id: &str) -> Option<&'a Value> {
    st["services"]
        .as_array()?
        .iter()
        .flat_map(|s| s["instances"].as_array().into_iter().flatten())
        .find(|i| i["id"] == id)
}

fn state_of(st: &Value, id: &str) -> Option<String> {
    instance(st, id).and_then(|i| i["state"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_shows_every_instance_with_state_rates_and_events() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let fleet = Fleet::new(&etcd).await?;
    let bs = Backends::start().await?;
    fleet.populate(&bs).await?;
    let lb = Lb::start(&lb_config(&etcd)).await?;

    // Traffic: 75 % to v1 (a and the failing f), 25 % to v2 (b).
    let load = Load::start(lb.url("/"), 4);
    let st = eventually("rates for a, b and f", WAIT, || async {
        let st = status(&lb).await.ok()?;
        let rps = |id| {
            instance(&st, id)
                .and_then(|i| i["rps"].as_f64())
                .unwrap_or(0.0)
        };
        (rps("n1-a-80") > 0.0 && rps("n1-b-80") > 0.0 && rps("n1-f-80") > 0.0).then_some(st)
    })
    .await?;
    let svc = &st["services"][0];
    assert_eq!(svc["name"], "web");
    assert_eq!(svc["source"], "etcd");
    assert_eq!(svc["instances"].as_array().map(Vec::len), Some(5), "{svc}");
    assert_eq!(state_of(&st, "n1-a-80").as_deref(), Some("serving"));
    assert_eq!(state_of(&st, "n1-b-80").as_deref(), Some("serving"));
    assert_eq!(state_of(&st, "n1-p-80").as_deref(), Some("pending"));
    assert_eq!(state_of(&st, "n1-c-80").as_deref(), Some("critical"));
    let c = instance(&st, "n1-c-80").context("c")?;
    assert_eq!(
        c["health"]["output"], HOSTILE,
        "output kept verbatim (escaped by the page)"
    );
    assert_eq!(c["routed"], false);
    let split: Vec<(String, f64)> = svc["split"]
        .as_array()
        .context("split")?
        .iter()
        .map(|s| {
            (
                s["version"].as_str().unwrap_or("").to_owned(),
                s["percent"].as_f64().unwrap_or(-1.0),
            )
        })
        .collect();
    assert_eq!(
        split,
        vec![("v1".to_owned(), 75.0), ("v2".to_owned(), 25.0)]
    );
    // f answers 500 to everything: its error rate is 100 %, a's is 0, and p99 is known.
    let f = instance(&st, "n1-f-80").context("f")?;
    assert_eq!(f["error_rate"].as_f64(), Some(1.0), "{f}");
    let a = instance(&st, "n1-a-80").context("a")?;
    assert_eq!(a["error_rate"].as_f64(), Some(0.0), "{a}");
    assert!(
        a["p99_ms"].as_f64().is_some_and(|p| p > 0.0 && p < 5_000.0),
        "{a}"
    );
    let v1 = svc["versions"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["version"] == "v1"))
        .context("v1")?;
    assert!(v1["error_rate"].as_f64().is_some_and(|e| e > 0.0), "{v1}");
    // f fails every request: outlier detection ejects it, and the page says so.
    eventually("f shown ejected, with an event", WAIT, || async {
        let st = status(&lb).await.ok()?;
        let ev = st["events"]
            .as_array()?
            .iter()
            .any(|e| e["kind"] == "ejected" && e["instance"] == "n1-f-80");
        (state_of(&st, "n1-f-80").as_deref() == Some("ejected") && ev).then_some(())
    })
    .await?;
    assert!(
        st["discovery"]["staleness_s"]
            .as_f64()
            .is_some_and(|s| s < 5.0),
        "{st}"
    );
    assert_eq!(st["listeners"][0]["routes"][0]["service"], "web");

    // Drain b and remove f: the document and the event log say so.
    fleet.register("n1-b-80", "v2", &bs.b, "draining").await?;
    fleet
        .store
        .delete(&fleet.ks.instance(&"web".parse()?, &"n1-f-80".parse()?))
        .await?;
    let st = eventually("b draining, f removed", WAIT, || async {
        let st = status(&lb).await.ok()?;
        (state_of(&st, "n1-b-80").as_deref() == Some("draining")
            && instance(&st, "n1-f-80").is_none())
        .then_some(st)
    })
    .await?;
    let events = st["events"].as_array().context("events")?;
    let has = |kind: &str, id: &str| {
        events
            .iter()
            .any(|e| e["kind"] == kind && e["instance"] == id)
    };
    assert!(has("drained", "n1-b-80"), "{events:?}");
    assert!(has("removed", "n1-f-80"), "{events:?}");
    assert!(
        events.iter().any(|e| e["kind"] == "loaded"),
        "first load logged: {events:?}"
    );
    load.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_pushes_a_document_when_the_catalog_changes() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let fleet = Fleet::new(&etcd).await?;
    let bs = Backends::start().await?;
    fleet.populate(&bs).await?;
    let lb = Lb::start(&lb_config(&etcd)).await?;

    let url = format!("http://127.0.0.1:{}/api/status/stream", lb.admin);
    let resp = client().get(url.parse()?).await?;
    assert_eq!(
        resp.headers()["content-type"],
        "text/event-stream",
        "{:?}",
        resp.headers()
    );
    let mut body = resp.into_body();
    let mut buf = String::new();
    let mut next_doc = async || -> Result<Value> {
        loop {
            if let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                    return Ok(serde_json::from_str(data)?);
                }
                continue;
            }
            let frame = tokio::time::timeout(WAIT, body.frame())
                .await
                .context("no event")?
                .context("stream ended")??;
            if let Ok(d) = frame.into_data() {
                buf.push_str(std::str::from_utf8(&d)?);
            }
        }
    };
    // The first document may predate the first catalog load (the admin port opens first).
    let deadline = std::time::Instant::now() + WAIT;
    while state_of(&next_doc().await?, "n1-b-80").as_deref() != Some("serving") {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "b never streamed as serving"
        );
    }
    fleet.register("n1-b-80", "v2", &bs.b, "draining").await?;
    // Without a new request, the same connection delivers the change.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let doc = next_doc().await?;
        if state_of(&doc, "n1-b-80").as_deref() == Some("draining") {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "drain never streamed");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_in_headless_chromium_shows_the_fleet_and_follows_a_drain() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let fleet = Fleet::new(&etcd).await?;
    let bs = Backends::start().await?;
    fleet.populate(&bs).await?;
    let lb = Lb::start(&lb_config(&etcd)).await?;
    let load = Load::start(lb.url("/"), 2);
    let artefacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page");
    std::fs::create_dir_all(&artefacts)?;

    let page = format!("http://127.0.0.1:{}/", lb.admin);
    let explain = "document.body.innerText.slice(0, 3000)";
    let t = Duration::from_secs(30);
    let dir = artefacts.clone();
    let mut b = tokio::task::spawn_blocking(move || -> Result<chromium::Chromium> {
        let mut b = chromium::Chromium::start(&dir)?;
        b.open(&page)?;
        b.wait_for(
            "service and instances rendered over the live stream",
            r#"document.querySelector('[data-service="web"]') !== null
               && document.querySelectorAll('tr.instance').length === 5
               && document.getElementById('conn').textContent === 'live'"#,
            explain,
            t,
        )?;
        let states = b.eval(
            r#"Object.fromEntries([...document.querySelectorAll('tr.instance')]
                 .map(r => [r.dataset.instance, r.dataset.state]))"#,
        )?;
        // f answers 500 to everything: serving until outlier detection ejects it.
        let f = states["n1-f-80"].clone();
        anyhow::ensure!(
            (f == "serving" || f == "ejected")
                && states
                    == json!({"n1-a-80": "serving", "n1-b-80": "serving", "n1-f-80": f,
                              "n1-p-80": "pending", "n1-c-80": "critical"}),
            "states on the page: {states}"
        );
        // The hostile health output is shown as text and ran nothing.
        let safe = b.eval(
            r#"document.getElementById('pwn') === null
               && document.querySelector('img') === null
               && document.body.dataset.pwned === undefined
               && document.body.innerText.includes('<b id="pwn">boom</b>')"#,
        )?;
        anyhow::ensure!(safe == json!(true), "XSS: {}", b.eval(explain)?);
        // Split bar and live rates.
        b.wait_for(
            "split and traffic shown",
            r#"document.querySelector('.split').innerText.includes('v1 75%')
               && document.querySelector('.split').innerText.includes('v2 25%')
               && parseFloat(document.getElementById('t-rps').textContent) > 0"#,
            explain,
            t,
        )?;
        b.screenshot(&dir.join("before-drain.png"))?;
        b.eval("window.__wharfMarker = 42")?;
        Ok(b)
    })
    .await??;

    // Drain b in etcd; the open page follows without a reload.
    fleet.register("n1-b-80", "v2", &bs.b, "draining").await?;
    let dir = artefacts.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        b.wait_for(
            "b shown draining, with a 'drained' event",
            r#"document.querySelector('tr[data-instance="n1-b-80"]').dataset.state === 'draining'
               && [...document.querySelectorAll('#events li')]
                    .some(li => li.dataset.kind === 'drained' && li.innerText.includes('n1-b-80'))"#,
            explain,
            t,
        )?;
        anyhow::ensure!(b.eval("window.__wharfMarker")? == json!(42), "the page reloaded");
        b.screenshot(&dir.join("after-drain.png"))?;
        Ok(())
    })
    .await??;
    eprintln!("screenshots in {}", artefacts.display());
    load.stop().await;
    Ok(())
}

fn static_config(backends: &[(&Backend, &str)]) -> String {
    let eps: String = backends
        .iter()
        .map(|(b, v)| {
            format!(
                "  [[service.endpoint]]\n  addr = \"{}\"\n  version = \"{v}\"\n",
                b.addr
            )
        })
        .collect();
    format!(
        "[admin]\nbind = \"127.0.0.1:@ADMIN@\"\n\n[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:@PORT@\"\n  \
         [[listener.route]]\n  service = \"api\"\n\n[[service]]\nname = \"api\"\n{eps}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_services_and_reloads_show_up_without_etcd() -> Result<()> {
    let (a, b) = (Backend::start("a").await?, Backend::start("b").await?);
    let lb = Lb::start(&static_config(&[(&a, "v1")])).await?;
    // Asked once, right after the admin port answers: the first document is there.
    let st = status(&lb).await?;
    assert_eq!(st["services"][0]["name"], "api");
    assert_eq!(st["services"][0]["source"], "static");
    assert_eq!(st["discovery"]["source"], "static");
    assert_eq!(st["services"][0]["instances"][0]["id"], a.addr.to_string());
    assert_eq!(st["services"][0]["instances"][0]["state"], "serving");

    // A bad file: the event says the old configuration stays.
    lb.write_config("[[listener]\nnot toml")?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    eventually("reload_failed event", WAIT, || async {
        let st = status(&lb).await.ok()?;
        st["events"]
            .as_array()?
            .iter()
            .any(|e| e["kind"] == "reload_failed")
            .then_some(())
    })
    .await?;
    // A good one adds b: reload event, b added.
    lb.write_config(&static_config(&[(&a, "v1"), (&b, "v2")]))?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    let st = eventually("reload event and b added", WAIT, || async {
        let st = status(&lb).await.ok()?;
        let evs = st["events"].as_array()?;
        let reloaded = evs.iter().any(|e| e["kind"] == "reload");
        let added = evs
            .iter()
            .any(|e| e["kind"] == "added" && e["instance"] == b.addr.to_string());
        (reloaded && added).then_some(st)
    })
    .await?;
    assert_eq!(
        st["services"][0]["instances"].as_array().map(Vec::len),
        Some(2)
    );
    // Method other than GET on the API is refused; unknown admin paths still 404.
    let admin = format!("127.0.0.1:{}", lb.admin);
    let mut s = tokio::net::TcpStream::connect(&admin).await?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(
        b"POST /api/status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).await?;
    assert!(raw.starts_with("HTTP/1.1 405"), "{raw}");
    let (code, _) = get_with(&client(), &format!("http://{admin}/nope")).await?;
    assert_eq!(code, 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_shows_as_staleness_and_events_while_routing_goes_on() -> Result<()> {
    let mut etcd = EtcdServer::start()?;
    let fleet = Fleet::new(&etcd).await?;
    let bs = Backends::start().await?;
    fleet.populate(&bs).await?;
    let lb = Lb::start(&lb_config(&etcd)).await?;
    eventually("catalog loaded, fresh", WAIT, || async {
        let st = status(&lb).await.ok()?;
        (state_of(&st, "n1-a-80").as_deref() == Some("serving")
            && st["discovery"]["staleness_s"].as_f64()? < 3.0)
            .then_some(())
    })
    .await?;

    etcd.kill();
    let st = eventually(
        "staleness past 10 s and an event",
        Duration::from_secs(40),
        || async {
            let st = status(&lb).await.ok()?;
            let stale = st["discovery"]["staleness_s"].as_f64()? > 10.0;
            let ev = st["events"].as_array()?.iter().any(|e| {
                e["kind"] == "discovery"
                    && e["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("has not confirmed"))
            });
            (stale && ev).then_some(st)
        },
    )
    .await?;
    // The last known state keeps serving, and the page still lists it.
    assert_eq!(state_of(&st, "n1-a-80").as_deref(), Some("serving"));
    let (code, body) = get_with(&client(), &lb.url("/")).await?;
    assert!(code.is_success() || code.as_u16() == 500, "{code} {body}");

    etcd.restart()?;
    eventually("etcd confirms again", Duration::from_secs(40), || async {
        let st = status(&lb).await.ok()?;
        let fresh = st["discovery"]["staleness_s"].as_f64()? < 3.0;
        let ev = st["events"].as_array()?.iter().any(|e| {
            e["kind"] == "discovery"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("confirms the catalog again"))
        });
        (fresh && ev).then_some(())
    })
    .await?;
    Ok(())
}
