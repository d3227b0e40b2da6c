//! The node agent end to end: real etcd, the real `registrar` binary, busybox containers.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use catalog::{InstanceState, Store};
use common::agent::{TestAgent, http_get_via, instances, port_open};
use common::{assert_nothing_left, busybox_rootfs, unique, unique_subnet};
use wharf_tests::{EtcdServer, eventually, free_port};

struct World {
    _tmp: tempfile::TempDir,
    etcd: EtcdServer,
    rootfs: std::path::PathBuf,
    state: std::path::PathBuf,
    node: String,
}

fn world() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(tmp.path());
    fs::create_dir_all(rootfs.join("www")).unwrap();
    fs::write(rootfs.join("www/index.html"), "hello\n").unwrap();
    let state = tmp.path().join("state");
    World {
        etcd: EtcdServer::start().unwrap(),
        node: unique("n"),
        _tmp: tmp,
        rootfs,
        state,
    }
}

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread")]
async fn registers_once_the_port_opens_deregisters_on_exit_and_after_restart() {
    let w = world();
    let store = w.etcd.store().await.unwrap();
    let agent = TestAgent::start(&w.etcd, &w.node, &w.state, &[]);
    let port = free_port().unwrap();
    let rootfs = w.rootfs.to_str().unwrap();
    // The port opens after 1 s; the app then exits with 3 after 1.5 s more; one restart.
    agent.cli_ok(&[
        "run",
        "--service",
        "web",
        "--version",
        "v1",
        "--image",
        rootfs,
        "--port",
        &port.to_string(),
        "--restart",
        "on-failure:1",
        "--memory",
        "64M",
        "--pids",
        "32",
        "--",
        "sh",
        "-c",
        "sleep 1; httpd -f -p $PORT -h /www & sleep 2.5; exit 3",
    ]);
    let name = "web-v1-0";
    assert!(
        instances(&store, "web").await.is_empty(),
        "registered before the port opened"
    );
    for run in 0..2 {
        let (key, inst, rev, _) = eventually("registration", WAIT, || async {
            instances(&store, "web").await.into_iter().next()
        })
        .await
        .unwrap();
        assert!(port_open(port), "registered while the port was closed");
        assert_eq!(inst.state, InstanceState::Serving);
        assert_eq!(inst.port, port);
        assert_eq!(inst.id.as_str(), format!("{}-{name}-{port}", w.node));
        assert!(key.ends_with(inst.id.as_str()));
        let _ = rev;
        // The exit: measure from the moment the port stops answering.
        let closed = eventually("app exit", WAIT, || async {
            (!port_open(port)).then(Instant::now)
        })
        .await
        .unwrap();
        eventually("deregistration", WAIT, || async {
            instances(&store, "web").await.is_empty().then_some(())
        })
        .await
        .unwrap();
        assert!(
            closed.elapsed() < Duration::from_secs(1),
            "run {run}: deregistered {:?} after exit",
            closed.elapsed()
        );
    }
    let ps: serde_json::Value = serde_json::from_str(&agent.cli_ok(&["ps", "--json"])).unwrap();
    eventually("final state", WAIT, || async {
        let ps: serde_json::Value = serde_json::from_str(&agent.cli_ok(&["ps", "--json"])).unwrap();
        (ps[0]["state"] == "exited").then_some(())
    })
    .await
    .unwrap();
    let ps_now: serde_json::Value = serde_json::from_str(&agent.cli_ok(&["ps", "--json"])).unwrap();
    assert_eq!(ps_now[0]["exit_code"], 3, "{ps}");
    assert_eq!(ps_now[0]["restarts"], 1);
    assert!(instances(&store, "web").await.is_empty(), "no third run");
    // Metrics on the admin port.
    let metrics = http_get(agent.admin_port, "/metrics").await;
    assert!(
        metrics.contains("registrar_registrations_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("registrar_container_starts_total 2"),
        "{metrics}"
    );
    // Logs captured, then removed with the container.
    let logs = agent.cli_ok(&["logs", name]);
    let _ = logs;
    agent.cli_ok(&["rm", name]);
    assert!(!agent.container_dir(name).exists());
    assert_nothing_left(&agent.cgroup_name(name), &w.state);
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_drains_first_then_sigterm_then_deletes() {
    let w = world();
    let store = w.etcd.store().await.unwrap();
    let agent = TestAgent::start(&w.etcd, &w.node, &w.state, &[]);
    agent.cli_ok(&[
        "service",
        "set",
        "web",
        "--drain-timeout",
        "1s",
        "--check-path",
        "/index.html",
    ]);
    let cfg = store
        .get("/wharf/v1/services/web/config")
        .await
        .unwrap()
        .unwrap();
    let cfg: catalog::ServiceConfig = serde_json::from_slice(&cfg.value).unwrap();
    assert_eq!(cfg.drain_timeout, Duration::from_secs(1));
    assert_eq!(cfg.check.path.as_deref(), Some("/index.html"));
    let port = free_port().unwrap();
    agent.cli_ok(&[
        "run", "--service", "web", "--version", "v2", "--image", w.rootfs.to_str().unwrap(),
        "--port", &port.to_string(), "--",
        "sh", "-c", "trap 'echo got-term; exit 0' TERM; httpd -f -p $PORT -h /www & while true; do sleep 0.05; done",
    ]);
    let name = "web-v2-0";
    eventually("registration", WAIT, || async {
        instances(&store, "web").await.into_iter().next()
    })
    .await
    .unwrap();
    let log = agent.container_dir(name).join("log");
    let stopper = {
        let state = w.state.clone();
        std::thread::spawn(move || {
            std::process::Command::new(common::BIN)
                .args(["stop", name, "--grace", "5s"])
                .env("WHARF_STATE_DIR", state)
                .output()
                .unwrap()
        })
    };
    let draining_at = eventually("draining state", WAIT, || async {
        let i = instances(&store, "web").await;
        i.first()
            .filter(|(_, inst, _, _)| inst.state == InstanceState::Draining)
            .map(|_| Instant::now())
    })
    .await
    .unwrap();
    assert!(
        !fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("got-term"),
        "SIGTERM before draining was visible"
    );
    assert!(
        port_open(port),
        "still serving in-flight work while draining"
    );
    let term_at = eventually("SIGTERM reaches the app", WAIT, || async {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("got-term")
            .then(Instant::now)
    })
    .await
    .unwrap();
    assert!(
        term_at - draining_at >= Duration::from_millis(800),
        "drain timeout not honoured: {:?}",
        term_at - draining_at
    );
    let out = stopper.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("exit 0"));
    assert!(
        instances(&store, "web").await.is_empty(),
        "keys deleted after the stop"
    );
    assert_nothing_left(&agent.cgroup_name(name), &w.state);

    // An app that ignores SIGTERM is killed after the grace period.
    agent.cli_ok(&["service", "set", "stubborn", "--drain-timeout", "0s"]);
    let port = free_port().unwrap();
    agent.cli_ok(&[
        "run",
        "--service",
        "stubborn",
        "--version",
        "v1",
        "--image",
        w.rootfs.to_str().unwrap(),
        "--port",
        &port.to_string(),
        "--",
        "sh",
        "-c",
        "trap '' TERM; httpd -f -p $PORT -h /www & while true; do sleep 0.05; done",
    ]);
    eventually("registration", WAIT, || async {
        instances(&store, "stubborn").await.into_iter().next()
    })
    .await
    .unwrap();
    let started = Instant::now();
    let out = agent.cli_ok(&["stop", "stubborn", "--grace", "500ms"]);
    assert!(out.contains("exit 137"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(instances(&store, "stubborn").await.is_empty());
    assert_nothing_left(&agent.cgroup_name("stubborn-v1-0"), &w.state);
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_agent_keys_expire_and_a_restarted_agent_reconciles() {
    let w = world();
    let store = w.etcd.store().await.unwrap();
    let mut agent = TestAgent::start(&w.etcd, &w.node, &w.state, &["--lease-ttl", "3s"]);
    let (p1, p2, ext) = (
        free_port().unwrap(),
        free_port().unwrap(),
        free_port().unwrap(),
    );
    let rootfs = w.rootfs.to_str().unwrap();
    let httpd = ["sh", "-c", "exec httpd -f -p $PORT -h /www"];
    for (svc, port) in [("keep", p1), ("dies", p2)] {
        let mut args = vec![
            "run",
            "--service",
            svc,
            "--version",
            "v1",
            "--image",
            rootfs,
        ];
        let port = port.to_string();
        args.extend(["--port", &port, "--"]);
        args.extend(httpd);
        agent.cli_ok(&args);
    }
    agent.cli_ok(&[
        "register",
        "--service",
        "legacy",
        "--addr",
        &format!("127.0.0.1:{ext}"),
    ]);
    for svc in ["keep", "dies", "legacy"] {
        eventually("registration", WAIT, || async {
            instances(&store, svc).await.into_iter().next()
        })
        .await
        .unwrap();
    }
    // A registration of this node that nothing backs (left by an older agent).
    let stale_key = format!("/wharf/v1/services/web/instances/{}-old-0-1", w.node);
    let stale = serde_json::json!({"id": format!("{}-old-0-1", w.node), "service": "web", "version": "v0",
        "node": w.node, "addr": "127.0.0.1", "port": 1});
    store
        .put(&stale_key, serde_json::to_vec(&stale).unwrap(), None)
        .await
        .unwrap();

    let keep_helper = agent.helper_pid("keep-v1-0").unwrap();
    agent.kill9();
    // The containers outlive the agent; their keys go with the lease.
    assert!(port_open(p1) && port_open(p2));
    let killed = Instant::now();
    eventually(
        "keys expire with the lease",
        Duration::from_secs(15),
        || async {
            let gone = instances(&store, "keep").await.is_empty()
                && instances(&store, "legacy").await.is_empty()
                && store
                    .get(&format!("/wharf/v1/nodes/{}", w.node))
                    .await
                    .unwrap()
                    .is_none();
            gone.then_some(())
        },
    )
    .await
    .unwrap();
    assert!(
        killed.elapsed() >= Duration::from_secs(2),
        "keys went before the TTL"
    );
    // One container dies while no agent is watching.
    let dead_init = agent.init_pid("dies-v1-0").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dead_init),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually("container death", WAIT, || async {
        (!port_open(p2)).then_some(())
    })
    .await
    .unwrap();

    agent.spawn();
    eventually("adopted container re-registered", WAIT, || async {
        instances(&store, "keep").await.into_iter().next()
    })
    .await
    .unwrap();
    eventually("external registration restored", WAIT, || async {
        instances(&store, "legacy").await.into_iter().next()
    })
    .await
    .unwrap();
    // Reconciliation deletes what nothing backs; it may land just after the re-puts.
    eventually("stale key of this node removed", WAIT, || async {
        store.get(&stale_key).await.unwrap().is_none().then_some(())
    })
    .await
    .unwrap();
    assert!(instances(&store, "dies").await.is_empty());
    assert_eq!(
        agent.helper_pid("keep-v1-0"),
        Some(keep_helper),
        "adopted, not restarted"
    );
    let ps: serde_json::Value = serde_json::from_str(&agent.cli_ok(&["ps", "--json"])).unwrap();
    let state_of = |n: &str| {
        ps.as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(state_of("dies-v1-0"), "exited");
    assert_nothing_left(&agent.cgroup_name("dies-v1-0"), &w.state);
    // The adopted container still drains and stops normally.
    agent.cli_ok(&["service", "set", "keep", "--drain-timeout", "0s"]);
    agent.cli_ok(&["stop", "keep", "--grace", "2s"]);
    assert!(instances(&store, "keep").await.is_empty());
    assert!(!port_open(p1));
    assert_nothing_left(&agent.cgroup_name("keep-v1-0"), &w.state);
    agent.cli_ok(&[
        "deregister",
        "--service",
        "legacy",
        "--port",
        &ext.to_string(),
    ]);
    assert!(instances(&store, "legacy").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn lost_lease_is_regranted_and_keys_put_again() {
    let w = world();
    let store = w.etcd.store().await.unwrap();
    let agent = TestAgent::start(&w.etcd, &w.node, &w.state, &["--lease-ttl", "3s"]);
    let port = free_port().unwrap();
    agent.cli_ok(&[
        "run",
        "--service",
        "api",
        "--version",
        "v1",
        "--image",
        w.rootfs.to_str().unwrap(),
        "--port",
        &port.to_string(),
        "--",
        "sh",
        "-c",
        "exec httpd -f -p $PORT -h /www",
    ]);
    let (_, _, _, lease) = eventually("registration", WAIT, || async {
        instances(&store, "api").await.into_iter().next()
    })
    .await
    .unwrap();
    store.lease_revoke(lease).await.unwrap();
    let (_, inst, _, new_lease) = eventually("re-registration under a new lease", WAIT, || async {
        instances(&store, "api")
            .await
            .into_iter()
            .next()
            .filter(|(_, _, _, l)| *l != lease)
    })
    .await
    .unwrap();
    assert_eq!(inst.port, port);
    let node = store
        .get(&format!("/wharf/v1/nodes/{}", w.node))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(node.lease, new_lease);
    let metrics = http_get(agent.admin_port, "/metrics").await;
    assert!(
        metrics.contains("registrar_lease_regrants_total 1"),
        "{metrics}"
    );
    agent.cli_ok(&["service", "set", "api", "--drain-timeout", "0s"]);
    agent.cli_ok(&["stop", "api", "--grace", "2s"]);
    assert_nothing_left(&agent.cgroup_name("api-v1-0"), &w.state);
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_split_and_bad_input() {
    let w = world();
    let store = w.etcd.store().await.unwrap();
    let agent = TestAgent::start(&w.etcd, &w.node, &w.state, &[]);
    agent.cli_ok(&["split", "web", "v1=90", "v2=10"]);
    agent.cli_ok(&["service", "set", "web", "--interval", "2s", "--rise", "3"]);
    let kv = store
        .get("/wharf/v1/services/web/config")
        .await
        .unwrap()
        .unwrap();
    let cfg: catalog::ServiceConfig = serde_json::from_slice(&kv.value).unwrap();
    assert_eq!(cfg.split.len(), 2);
    assert_eq!(cfg.check.interval, Duration::from_secs(2));
    assert_eq!(cfg.check.rise, 3);
    for bad in [
        vec!["split", "web", "v1=abc"],
        vec!["service", "set", "Web!", "--rise", "2"],
        vec![
            "run",
            "--service",
            "web",
            "--version",
            "v1",
            "--image",
            "/nonexistent",
            "--port",
            "1",
            "--",
            "true",
        ],
        vec!["logs", "nope"],
        vec!["rm", "nope"],
    ] {
        let o = agent.cli(&bad);
        assert!(!o.status.success(), "{bad:?} should fail");
        assert!(!o.stderr.is_empty(), "{bad:?} should say why");
    }
    let o = agent.cli(&["agent", "--check", "--node", "Bad_Name"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("Bad_Name"));
    let o = agent.cli(&["agent", "--check", "--node", "ok"]);
    assert!(o.status.success());
}

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn bridge_network_registers_the_container_address_and_cleans_up() {
    let w = world();
    let store = w.etcd.store().await.unwrap();
    let suffix = rand::random::<u32>() & 0xffffff;
    let bridge = format!("wt{suffix:06x}");
    let subnet = unique_subnet(&[]);
    let agent = TestAgent::start(
        &w.etcd,
        &w.node,
        &w.state,
        &["--bridge", &format!("{bridge}={subnet}")],
    );
    agent.cli_ok(&[
        "run",
        "--service",
        "br",
        "--version",
        "v1",
        "--image",
        w.rootfs.to_str().unwrap(),
        "--port",
        "8080",
        "--replicas",
        "2",
        "--network",
        "bridge",
        "--",
        "sh",
        "-c",
        "exec httpd -f -p $PORT -h /www",
    ]);
    let regs = eventually("both replicas registered", WAIT, || async {
        let i = instances(&store, "br").await;
        (i.len() == 2).then_some(i)
    })
    .await
    .unwrap();
    let prefix = subnet.trim_end_matches("0/24");
    for (_, inst, _, _) in &regs {
        let addr = inst.addr.to_string();
        assert!(
            addr.starts_with(prefix),
            "registered with its bridge address: {addr}"
        );
        assert_eq!(inst.port, 8080);
        // Talk to the address the test's own bridge gave the container, through that bridge
        // only: a missing route must fail here, never reach anything outside the host.
        let target = format!("{addr}:8080");
        let body = eventually("the container answering through the bridge", WAIT, || {
            let (target, bridge) = (target.clone(), bridge.clone());
            async move {
                let body = http_get_via(&target, &bridge, "/").await.ok()?;
                body.contains("hello").then_some(body)
            }
        })
        .await
        .unwrap();
        assert!(body.contains("hello"), "{body}");
    }
    assert_ne!(regs[0].1.addr, regs[1].1.addr);
    assert!(
        std::path::Path::new("/sys/class/net")
            .join(&bridge)
            .exists()
    );
    agent.cli_ok(&["service", "set", "br", "--drain-timeout", "0s"]);
    agent.cli_ok(&["stop", "br", "--grace", "2s"]);
    assert!(instances(&store, "br").await.is_empty());
    for n in ["br-v1-0", "br-v1-1"] {
        assert_nothing_left(&agent.cgroup_name(n), &w.state);
    }
    let links: Vec<String> = fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!links.contains(&bridge), "bridge left behind: {links:?}");
    for n in ["br-v1-0", "br-v1-1"] {
        let spec: serde_json::Value =
            serde_json::from_slice(&fs::read(agent.container_dir(n).join("spec.json")).unwrap())
                .unwrap();
        let veth = spec["net"]["host_veth"].as_str().unwrap().to_string();
        assert!(!links.contains(&veth), "veth {veth} left behind");
    }
}
