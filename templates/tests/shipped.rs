//! The shipped templates (templates/haproxy.cfg.tera, templates/nginx.conf.tera), rendered by
//! the real `render` binary from a real etcd and validated by the real `haproxy -c` and
//! `nginx -t` (as each resource's check_cmd, and once more on the installed files).

mod common;

use std::process::Command;

use anyhow::Result;
use common::*;
use serde_json::json;
use wharf_tests::EtcdServer;

const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/templates");

fn nginx_args(tmp: &std::path::Path) -> String {
    format!(
        "-p {t}/ -g 'pid {t}/nginx.pid; error_log {t}/nginx-error.log;'",
        t = tmp.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_templates_pass_haproxy_and_nginx_checks() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let cat = Catalog::new(etcd.store().await?);
    cat.checker("c1").await?;
    cat.config(
        "web",
        json!({"split": {"v1": 90, "v2": 10}, "algorithm": "least_conn"}),
    )
    .await?;
    cat.up("web", "w1", "v1", 8001).await?;
    cat.up("web", "w2", "v1", 8002).await?;
    cat.up("web", "w3", "v2", 8003).await?;
    cat.instance("web", "w4", "v1", 8004, 100, "http").await?;
    cat.health("web", "w4", "critical").await?;
    cat.raw(
        &cat.ks.instance(&"web".parse()?, &"w5".parse()?),
        &json!({"id": "w5", "service": "web", "version": "v1", "node": "n1",
                "addr": "127.0.0.1", "port": 8005, "state": "draining"})
        .to_string(),
    )
    .await?;
    cat.health("web", "w5", "passing").await?;
    cat.instance("db", "d1", "v1", 5432, 100, "tcp").await?;
    cat.health("db", "d1", "passing").await?;
    // No instance passing (pending): panic mode routes to it rather than to nothing.
    cat.instance("legacy", "l1", "v1", 9001, 100, "http")
        .await?;

    let setup = Setup::new(&etcd.endpoint(), &format!("template_dir = \"{SHIPPED}\""))?;
    let tmp = setup.path("run");
    std::fs::create_dir_all(tmp.join("nginx-tmp"))?;
    let services = r#"services = ["web", "api", "db", "legacy"]"#;
    setup.resource(
        "haproxy",
        &format!(
            "[template]\nsrc = \"haproxy.cfg.tera\"\ndest = \"{dest}\"\n{services}\n\
             check_cmd = \"haproxy -c -q -f {{{{src}}}}\"\n\
             [template.vars]\nbind = \"127.0.0.1:18080\"\nstats_socket = \"{t}/admin.sock\"\n\
             default_service = \"web\"\ntcp_binds = {{ db = \"127.0.0.1:15432\" }}\n",
            dest = setup.out("haproxy.cfg").display(),
            t = tmp.display()
        ),
    )?;
    setup.resource(
        "nginx",
        &format!(
            "[template]\nsrc = \"nginx.conf.tera\"\ndest = \"{dest}\"\n{services}\n\
             check_cmd = \"nginx -t -q {args} -c {{{{src}}}}\"\n\
             [template.vars]\nlisten = \"127.0.0.1:18081\"\ntemp_dir = \"{t}/nginx-tmp\"\n",
            dest = setup.out("nginx.conf").display(),
            args = nginx_args(&tmp).replace('"', "\\\""),
            t = tmp.display()
        ),
    )?;
    let out = setup.onetime(&[])?;
    ensure(out.status.success(), || {
        String::from_utf8_lossy(&out.stderr).into_owned()
    })?;

    let haproxy = setup.read_out("haproxy.cfg").unwrap_or_default();
    // Split 90/10 over two v1 servers and one v2 server: 45 % + 45 % + 10 %.
    for want in [
        "server w1 127.0.0.1:8001 weight 256",
        "server w2 127.0.0.1:8002 weight 256",
        "server w3 127.0.0.1:8003 weight 57",
        "balance leastconn",
        "backend be_api\n",
        "listen tcp_db\n    mode tcp\n    bind 127.0.0.1:15432",
        "server d1 127.0.0.1:5432 weight 100",
        "server l1 127.0.0.1:9001 weight 100",
        "default_backend be_web",
    ] {
        ensure(haproxy.contains(want), || {
            format!("missing {want:?} in\n{haproxy}")
        })?;
    }
    for unwanted in ["w4", "w5", "be_db"] {
        ensure(!haproxy.contains(unwanted), || {
            format!("{unwanted:?} rendered in\n{haproxy}")
        })?;
    }
    let api = haproxy.split("backend be_api").nth(1).unwrap_or_default();
    ensure(
        !api.split("\n\n")
            .next()
            .unwrap_or_default()
            .contains("server"),
        || format!("empty service has servers:\n{haproxy}"),
    )?;

    let nginx = setup.read_out("nginx.conf").unwrap_or_default();
    for want in [
        "server 127.0.0.1:8001 weight=256",
        "server 127.0.0.1:8003 weight=57",
        "least_conn;",
        "return 503 \"service api has no instance\\n\";",
    ] {
        ensure(nginx.contains(want), || {
            format!("missing {want:?} in\n{nginx}")
        })?;
    }
    ensure(!nginx.contains("8004") && !nginx.contains("8005"), || {
        nginx.clone()
    })?;
    ensure(
        nginx.contains("TCP service db: not exposed") && !nginx.contains("5432"),
        || nginx.clone(),
    )?;

    // And once more by hand on the installed files.
    let h = Command::new("haproxy")
        .args(["-c", "-f"])
        .arg(setup.out("haproxy.cfg"))
        .output()?;
    ensure(h.status.success(), || {
        format!(
            "{}{}",
            String::from_utf8_lossy(&h.stdout),
            String::from_utf8_lossy(&h.stderr)
        )
    })?;
    let n = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "nginx -t {} -c {}",
            nginx_args(&tmp),
            setup.out("nginx.conf").display()
        ))
        .output()?;
    ensure(n.status.success(), || {
        String::from_utf8_lossy(&n.stderr).into_owned()
    })?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_templates_with_an_empty_catalog_are_valid() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let setup = Setup::new(&etcd.endpoint(), &format!("template_dir = \"{SHIPPED}\""))?;
    let tmp = setup.path("run");
    std::fs::create_dir_all(&tmp)?;
    setup.resource(
        "haproxy",
        &format!(
            "[template]\nsrc = \"haproxy.cfg.tera\"\ndest = \"{}\"\nservices = [\"*\"]\n\
             check_cmd = \"haproxy -c -q -f {{{{src}}}}\"\n[template.vars]\nstats_socket = \"{}/a.sock\"\n",
            setup.out("haproxy.cfg").display(),
            tmp.display()
        ),
    )?;
    setup.resource(
        "nginx",
        &format!(
            "[template]\nsrc = \"nginx.conf.tera\"\ndest = \"{}\"\nservices = [\"*\", \"web\"]\n\
             check_cmd = \"nginx -t -q {} -c {{{{src}}}}\"\n",
            setup.out("nginx.conf").display(),
            nginx_args(&tmp).replace('"', "\\\"")
        ),
    )?;
    let out = setup.onetime(&[])?;
    ensure(out.status.success(), || {
        String::from_utf8_lossy(&out.stderr).into_owned()
    })?;
    let haproxy = setup.read_out("haproxy.cfg").unwrap_or_default();
    ensure(haproxy.contains("default_backend be_no_service"), || {
        haproxy.clone()
    })?;
    Ok(())
}
