//! The `render` daemon against a real etcd: following changes, debounce, check and reload
//! failures with rollback, SIGHUP, etcd outages, `--onetime` and `--check`.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::*;
use nix::sys::signal::Signal;
use wharf_tests::EtcdServer;

const LIST: &str = "{% for i in services.web.instances %}{{ i.id }}={{ i.address }}/{{ i.lb_weight }}\n{% endfor %}count={{ services.web.instances | length }}\n";

fn resource(setup: &Setup, extra: &str) -> String {
    format!(
        "[template]\nsrc = \"list.tera\"\ndest = \"{}\"\nservices = [\"web\"]\n{extra}\n",
        setup.out("list.txt").display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renders_from_real_etcd_and_follows_changes() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let cat = Catalog::new(etcd.store().await?);
    cat.checker("c1").await?;
    cat.up("web", "a", "v1", 8001).await?;
    cat.instance("web", "b", "v1", 8002, 100, "http").await?; // pending: no traffic
    let setup = Setup::new(&etcd.endpoint(), "")?;
    setup.template("list.tera", LIST)?;
    setup.resource("list", &resource(&setup, "mode = \"0640\""))?;
    let render = setup.spawn()?;

    until("first render", || {
        setup
            .read_out("list.txt")
            .filter(|s| s == "a=127.0.0.1:8001/100\ncount=1\n")
    })
    .await?;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(setup.out("list.txt"))?
        .permissions()
        .mode()
        & 0o7777;
    ensure(mode == 0o640, || format!("mode {mode:o}"))?;

    cat.health("web", "b", "passing").await?;
    until("b added", || {
        setup
            .read_out("list.txt")
            .filter(|s| s.contains("b=127.0.0.1:8002") && s.contains("count=2"))
    })
    .await?;
    cat.health("web", "a", "critical").await?;
    until("a health-filtered", || {
        setup
            .read_out("list.txt")
            .filter(|s| s == "b=127.0.0.1:8002/100\ncount=1\n")
    })
    .await?;
    // Every instance gone: an empty list, not an error and not the old servers (confd #216).
    cat.remove("web", "a").await?;
    cat.remove("web", "b").await?;
    until("empty service rendered empty", || {
        setup.read_out("list.txt").filter(|s| s == "count=0\n")
    })
    .await?;
    ensure(strays(&setup.path("out"), &["list.txt"]).is_empty(), || {
        "temp files left".into()
    })?;
    // The counters move right after the file does.
    wharf_tests::eventually("writes metric", WAIT, || async {
        (render
            .metric("wharf_render_writes_total{resource=\"list\"}")
            .await
            .ok()?
            >= 4.0)
            .then_some(())
    })
    .await?;
    ensure(
        render
            .metric("wharf_render_last_success_timestamp_seconds{resource=\"list\"}")
            .await?
            > 1e9,
        || "last success metric".into(),
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debounce_coalesces_a_burst_of_100_changes_into_one_render() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let cat = Catalog::new(etcd.store().await?);
    let setup = Setup::new(&etcd.endpoint(), "")?;
    setup.template("kv.tera", "keys={{ kv | length }}\n")?;
    setup.resource(
        "kv",
        &format!(
            "[template]\nsrc = \"kv.tera\"\ndest = \"{}\"\nprefixes = [\"/app\"]\n\
             wait = {{ min = \"400ms\", max = \"10s\" }}\nreload_cmd = \"echo reload >> {}\"\n",
            setup.out("kv.txt").display(),
            setup.path("reloads.log").display()
        ),
    )?;
    let render = setup.spawn()?;
    until("first render", || {
        setup.read_out("kv.txt").filter(|s| s == "keys=0\n")
    })
    .await?;
    let reloads = || {
        std::fs::read_to_string(setup.path("reloads.log"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    until("first reload", || (reloads() == 1).then_some(())).await?;
    let renders = "wharf_render_renders_total{resource=\"kv\"}";
    ensure(render.metric(renders).await? == 1.0, || {
        "one render at start".into()
    })?;

    for n in 0..100 {
        cat.raw(&format!("/app/key-{n:03}"), "x").await?;
    }
    until("burst rendered", || {
        setup.read_out("kv.txt").filter(|s| s == "keys=100\n")
    })
    .await?;
    // Wait out one more quiet period so that a second (wrong) render would have happened.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let n = render.metric(renders).await?;
    ensure(n == 2.0, || format!("{n} renders for start + one burst"))?;
    ensure(reloads() == 2, || format!("{} reloads", reloads()))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_failure_leaves_the_destination_untouched() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let cat = Catalog::new(etcd.store().await?);
    cat.raw("/app/mode", "good").await?;
    let setup = Setup::new(&etcd.endpoint(), "")?;
    setup.template("v.tera", "mode={{ kv[\"/app/mode\"] }}\n")?;
    setup.resource(
        "v",
        &format!(
            "[template]\nsrc = \"v.tera\"\ndest = \"{}\"\nprefixes = [\"/app\"]\n\
             check_cmd = \"! grep -q BROKEN {{{{src}}}}\"\nreload_cmd = \"echo reload >> {}\"\n",
            setup.out("v.txt").display(),
            setup.path("reloads.log").display()
        ),
    )?;
    let render = setup.spawn()?;
    until("first render", || {
        setup.read_out("v.txt").filter(|s| s == "mode=good\n")
    })
    .await?;
    cat.raw("/app/mode", "BROKEN").await?;
    let failures = "wharf_render_failures_total{resource=\"v\",stage=\"check\"}";
    wharf_tests::eventually("check failure counted", WAIT, || async {
        (render.metric(failures).await.ok()? >= 1.0).then_some(())
    })
    .await?;
    ensure(
        setup.read_out("v.txt").as_deref() == Some("mode=good\n"),
        || "destination changed after a failed check".into(),
    )?;
    ensure(strays(&setup.path("out"), &["v.txt"]).is_empty(), || {
        format!(
            "staged file left: {:?}",
            strays(&setup.path("out"), &["v.txt"])
        )
    })?;
    let reloads = std::fs::read_to_string(setup.path("reloads.log"))?;
    ensure(reloads.lines().count() == 1, || {
        "reloaded after a failed check".into()
    })?;
    ensure(render.log().contains("stage=\"check\""), || render.log())?;
    // A good value goes through again.
    cat.raw("/app/mode", "fixed").await?;
    until("fixed value rendered", || {
        setup.read_out("v.txt").filter(|s| s == "mode=fixed\n")
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_failure_restores_the_previous_file_and_reloads_it() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let cat = Catalog::new(etcd.store().await?);
    cat.raw("/app/mode", "good").await?;
    let setup = Setup::new(&etcd.endpoint(), "")?;
    setup.template("v.tera", "mode={{ kv[\"/app/mode\"] }}\n")?;
    // The "service" reads its config on reload and refuses a BROKEN one.
    setup.resource(
        "v",
        &format!(
            "[template]\nsrc = \"v.tera\"\ndest = \"{dest}\"\nprefixes = [\"/app\"]\nbackup = true\n\
             reload_cmd = \"cat {{{{dest}}}} >> {log}; ! grep -q BROKEN {{{{dest}}}}\"\n",
            dest = setup.out("v.txt").display(),
            log = setup.path("reloads.log").display()
        ),
    )?;
    let render = setup.spawn()?;
    until("first render", || {
        setup.read_out("v.txt").filter(|s| s == "mode=good\n")
    })
    .await?;
    cat.raw("/app/mode", "BROKEN").await?;
    let rollbacks = "wharf_render_rollbacks_total{resource=\"v\"}";
    wharf_tests::eventually("rollback", WAIT, || async {
        (render.metric(rollbacks).await.ok()? >= 1.0).then_some(())
    })
    .await?;
    let log_has_reload_again = || {
        std::fs::read_to_string(setup.path("reloads.log"))
            .ok()
            .filter(|s| s == "mode=good\nmode=BROKEN\nmode=good\n")
    };
    until("reload of the restored file", log_has_reload_again).await?;
    ensure(
        setup.read_out("v.txt").as_deref() == Some("mode=good\n"),
        || "previous file not restored".into(),
    )?;
    ensure(
        setup.read_out("v.txt.bak").as_deref() == Some("mode=good\n"),
        || "backup missing".into(),
    )?;
    let f = "wharf_render_failures_total{resource=\"v\",stage=\"reload\"}";
    ensure(render.metric(f).await? == 1.0, || {
        "reload failure metric".into()
    })?;
    let f = "wharf_render_failures_total{resource=\"v\",stage=\"rollback\"}";
    ensure(render.metric(f).await? == 0.0, || {
        "rollback failure metric".into()
    })?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_picks_up_new_resources_and_keeps_the_set_on_a_bad_one() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let cat = Catalog::new(etcd.store().await?);
    cat.checker("c1").await?;
    cat.up("web", "a", "v1", 8001).await?;
    let setup = Setup::new(&etcd.endpoint(), "")?;
    setup.template("list.tera", LIST)?;
    setup.resource("list", &resource(&setup, ""))?;
    let render = setup.spawn()?;
    until("first render", || setup.read_out("list.txt")).await?;

    setup.template(
        "ids.tera",
        "{% for i in services.web.all %}{{ i.id }}:{{ i.health }} {% endfor %}\n",
    )?;
    setup.resource(
        "ids",
        &format!(
            "[template]\nsrc = \"ids.tera\"\ndest = \"{}\"\nservices = [\"web\"]\n",
            setup.out("ids.txt").display()
        ),
    )?;
    render.signal(Signal::SIGHUP)?;
    until("new resource rendered", || {
        setup.read_out("ids.txt").filter(|s| s == "a:passing \n")
    })
    .await?;

    // A broken resource file: reported, and the running set keeps working.
    setup.resource("bad", "[template]\nsrc = \"ids.tera\"\n")?;
    render.signal(Signal::SIGHUP)?;
    wharf_tests::eventually("config reload failure counted", WAIT, || async {
        (render
            .metric("wharf_render_config_reload_failures_total")
            .await
            .ok()?
            >= 1.0)
            .then_some(())
    })
    .await?;
    ensure(render.log().contains("bad.toml"), || render.log())?;
    cat.up("web", "b", "v1", 8002).await?;
    until("old set still follows changes", || {
        setup
            .read_out("ids.txt")
            .filter(|s| s == "a:passing b:passing \n")
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_keeps_the_file_and_catches_up_afterwards() -> Result<()> {
    let mut etcd = EtcdServer::start()?;
    let cat = Catalog::new(etcd.store().await?);
    cat.checker("c1").await?;
    cat.up("web", "a", "v1", 8001).await?;
    let setup = Setup::new(&etcd.endpoint(), "resync_interval = \"1s\"")?;
    setup.template("list.tera", LIST)?;
    setup.resource("list", &resource(&setup, ""))?;
    let render = setup.spawn()?;
    let first = until("first render", || setup.read_out("list.txt")).await?;

    etcd.kill();
    let f = "wharf_render_failures_total{resource=\"list\",stage=\"list\"}";
    wharf_tests::eventually("failed etcd reads during the outage", WAIT, || async {
        (render.metric(f).await.ok()? >= 2.0).then_some(())
    })
    .await?;
    ensure(
        setup.read_out("list.txt").as_deref() == Some(first.as_str()),
        || "file changed while etcd was down".into(),
    )?;

    etcd.start_again()?;
    etcd.wait_healthy(WAIT)?;
    let cat = Catalog::new(etcd.store().await?);
    cat.up("web", "b", "v1", 8002).await?;
    until("change after the outage", || {
        setup.read_out("list.txt").filter(|s| s.contains("count=2"))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onetime_and_check_report_failures_with_exit_status() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let cat = Catalog::new(etcd.store().await?);
    cat.up("web", "a", "v1", 8001).await?;
    let setup = Setup::new(&etcd.endpoint(), "")?;
    setup.template("list.tera", LIST)?;
    setup.resource("list", &resource(&setup, ""))?;
    let out = setup.onetime(&[])?;
    ensure(out.status.success(), || {
        String::from_utf8_lossy(&out.stderr).into()
    })?;
    ensure(
        setup.read_out("list.txt").as_deref() == Some("a=127.0.0.1:8001/100\ncount=1\n"),
        || format!("{:?}", setup.read_out("list.txt")),
    )?;

    // --noop writes nothing.
    cat.up("web", "b", "v1", 8002).await?;
    let out = setup.onetime(&["--noop"])?;
    ensure(out.status.success(), || {
        String::from_utf8_lossy(&out.stderr).into()
    })?;
    ensure(
        setup.read_out("list.txt").unwrap().contains("count=1"),
        || "--noop wrote the destination".into(),
    )?;

    // An undefined variable fails the run, naming the template and position.
    setup.template("list.tera", "ok\n{{ services.web.nope }}\n")?;
    let out = setup.onetime(&[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure(!out.status.success(), || {
        "undefined variable exited 0".into()
    })?;
    ensure(err.contains("template list.tera:2:4"), || err.to_string())?;
    ensure(
        setup.read_out("list.txt").unwrap().contains("count=1"),
        || "failed render touched the destination".into(),
    )?;

    // --check catches it too, without etcd.
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_render"))
        .arg("--config")
        .arg(setup.config())
        .arg("--check")
        .output()?;
    let err = String::from_utf8_lossy(&check.stderr);
    ensure(
        !check.status.success() && err.contains("list.tera:2:4"),
        || err.to_string(),
    )?;
    // A bad resource names file, line and key.
    setup.template("list.tera", LIST)?;
    setup.resource(
        "bad",
        "[template]\nsrc = \"list.tera\"\ndest = \"/tmp/x\"\nmode = \"9z\"\n",
    )?;
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_render"))
        .arg("--config")
        .arg(setup.config())
        .arg("--check")
        .output()?;
    let err = String::from_utf8_lossy(&check.stderr);
    ensure(
        !check.status.success() && err.contains("bad.toml:4: `template.mode`"),
        || err.to_string(),
    )?;
    std::fs::remove_file(setup.path("conf.d/bad.toml"))?;

    // etcd unreachable: non-zero, file kept.
    drop(etcd);
    let out = setup.onetime(&[])?;
    ensure(!out.status.success(), || "etcd down exited 0".into())?;
    ensure(
        setup.read_out("list.txt").unwrap().contains("count=1"),
        || "file lost".into(),
    )?;
    Ok(())
}
