//! Bridge networking under concurrency: two agents, each with its own bridge and subnet,
//! start several bridge containers at the same time. Every container must be reachable
//! through its own bridge and only through it (the host route to its address goes through
//! its bridge; a connection forced through the other bridge fails), and everything is
//! removed afterwards.

mod common;

use std::fs;
use std::time::Duration;

use common::agent::{TestAgent, http_get_via, instances};
use common::{assert_nothing_left, busybox_rootfs, unique, unique_subnet};
use wharf_tests::{EtcdServer, eventually};

const WAIT: Duration = Duration::from_secs(30);
const REPLICAS: usize = 3;

struct Net {
    agent: TestAgent,
    service: String,
    bridge: String,
    subnet: String,
}

fn links() -> Vec<String> {
    fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// The device the host routes `addr` through.
fn route_dev(addr: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["-o", "route", "get", addr])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    words
        .by_ref()
        .find(|w| *w == "dev")
        .and_then(|_| words.next())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn containers_on_two_bridges_are_reachable_only_through_their_own() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(tmp.path());
    fs::create_dir_all(rootfs.join("www")).unwrap();
    fs::write(rootfs.join("www/index.html"), "hello\n").unwrap();
    let etcd = EtcdServer::start().unwrap();
    let store = etcd.store().await.unwrap();
    let first = unique_subnet(&[]);
    let second = unique_subnet(std::slice::from_ref(&first));
    let nets: Vec<Net> = [first, second]
        .into_iter()
        .enumerate()
        .map(|(i, subnet)| {
            let node = unique("n");
            let bridge = format!("wb{:06x}", rand::random::<u32>() & 0xffffff);
            let agent = TestAgent::start(
                &etcd,
                &node,
                &tmp.path().join(format!("state{i}")),
                &["--bridge", &format!("{bridge}={subnet}")],
            );
            Net {
                agent,
                service: format!("br{i}"),
                bridge,
                subnet,
            }
        })
        .collect();

    // Both agents start their containers at the same time: the helpers create the two
    // bridges and all the veths concurrently.
    let rootfs_s = rootfs.to_str().unwrap();
    std::thread::scope(|s| {
        for n in &nets {
            s.spawn(|| {
                n.agent.cli_ok(&[
                    "run",
                    "--service",
                    &n.service,
                    "--version",
                    "v1",
                    "--image",
                    rootfs_s,
                    "--port",
                    "8080",
                    "--replicas",
                    &REPLICAS.to_string(),
                    "--network",
                    "bridge",
                    "--",
                    "sh",
                    "-c",
                    "exec httpd -f -p $PORT -h /www",
                ])
            });
        }
    });

    let mut checks = tokio::task::JoinSet::new();
    for (i, n) in nets.iter().enumerate() {
        let other = &nets[1 - i];
        let regs = eventually("every replica registered", WAIT, || async {
            let regs = instances(&store, &n.service).await;
            (regs.len() == REPLICAS).then_some(regs)
        })
        .await
        .unwrap();
        let prefix = n.subnet.trim_end_matches("0/24");
        for (_, inst, _, _) in regs {
            let addr = inst.addr.to_string();
            assert!(addr.starts_with(prefix), "{addr} not in {}", n.subnet);
            assert_eq!(route_dev(&addr), n.bridge, "host route to {addr}");
            let target = format!("{addr}:8080");
            let (own, foreign) = (n.bridge.clone(), other.bridge.clone());
            checks.spawn(async move {
                let body = eventually("an answer through its own bridge", WAIT, || async {
                    let body = http_get_via(&target, &own, "/").await.ok()?;
                    body.contains("hello").then_some(body)
                })
                .await
                .unwrap();
                assert!(body.contains("200"), "{body}");
                let wrong = http_get_via(&target, &foreign, "/").await;
                assert!(
                    wrong.is_err(),
                    "{target} answered through the other bridge {foreign}: {wrong:?}"
                );
            });
        }
    }
    while let Some(done) = checks.join_next().await {
        done.unwrap();
    }

    for n in &nets {
        n.agent
            .cli_ok(&["service", "set", &n.service, "--drain-timeout", "0s"]);
    }
    std::thread::scope(|s| {
        for n in &nets {
            s.spawn(|| n.agent.cli_ok(&["stop", &n.service, "--grace", "2s"]));
        }
    });
    let links = links();
    for n in &nets {
        assert!(instances(&store, &n.service).await.is_empty());
        assert!(
            !links.contains(&n.bridge),
            "bridge {} left behind",
            n.bridge
        );
        for r in 0..REPLICAS {
            let name = format!("{}-v1-{r}", n.service);
            assert_nothing_left(&n.agent.cgroup_name(&name), &n.agent.state);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bridge_overlapping_another_ones_subnet_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(tmp.path());
    let etcd = EtcdServer::start().unwrap();
    let subnet = unique_subnet(&[]);
    let taken = format!("wo{:06x}", rand::random::<u32>() & 0xffffff);
    // Another bridge already routes the subnet (as a concurrent test's would).
    let ip = |args: &[&str]| {
        let o = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "ip {args:?}: {o:?}");
    };
    struct DelLink(String);
    impl Drop for DelLink {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &self.0])
                .output();
        }
    }
    ip(&["link", "add", &taken, "type", "bridge"]);
    let _taken = DelLink(taken.clone());
    ip(&[
        "addr",
        "add",
        &subnet.replace(".0/24", ".1/24"),
        "dev",
        &taken,
    ]);
    ip(&["link", "set", &taken, "up"]);

    let bridge = format!("wb{:06x}", rand::random::<u32>() & 0xffffff);
    let _bridge = DelLink(bridge.clone());
    let agent = TestAgent::start(
        &etcd,
        &unique("n"),
        &tmp.path().join("state"),
        &["--bridge", &format!("{bridge}={subnet}")],
    );
    agent.cli_ok(&[
        "run",
        "--service",
        "ov",
        "--version",
        "v1",
        "--image",
        rootfs.to_str().unwrap(),
        "--port",
        "8080",
        "--network",
        "bridge",
        "--",
        "sleep",
        "30",
    ]);
    let log = eventually("the container refused", WAIT, || async {
        let log = agent.log_text();
        log.contains("overlaps the route").then_some(log)
    })
    .await
    .unwrap();
    assert!(log.contains(&taken), "{log}");
    assert!(
        !links().contains(&bridge),
        "the overlapping bridge was created"
    );
    assert_nothing_left(&agent.cgroup_name("ov-v1-0"), &agent.state);
}
