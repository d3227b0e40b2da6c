//! OCSP stapling through the real binary: the response file of a certificate is stapled
//! (OpenSSL's `s_client -status` sees it), and a new response written over it is stapled
//! from the next handshakes on, with no restart.

mod common;
mod l4kit;

use std::process::Command;

use anyhow::Result;
use common::{Backend, Lb, WAIT};
use l4kit::https_config;
use wharf_tests::{TestPki, eventually};

/// What `openssl s_client -status` prints of one handshake with the listener.
async fn handshake(port: u16) -> Result<String> {
    let connect = format!("127.0.0.1:{port}");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("openssl")
            .args(["s_client", "-connect", &connect, "-servername", "localhost"])
            .arg("-status")
            .stdin(std::process::Stdio::null())
            .output()
    })
    .await??;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ocsp_response_is_stapled_and_follows_its_file() -> Result<()> {
    let pki = TestPki::generate()?;
    let web = Backend::start("web").await?;
    let dir = tempfile::tempdir()?;
    let resp = dir.path().join("server.ocsp");
    pki.ocsp_response(false, &resp)?;
    let ocsp = format!("ocsp = \"{}\"", resp.display());
    let config = https_config("https", &pki, web.addr, &ocsp, "");
    let lb = Lb::start(&config).await?;
    let said = handshake(lb.port).await?;
    assert!(
        said.contains("OCSP Response Status: successful") && said.contains("Cert Status: unknown"),
        "{said}"
    );

    // A new response renamed over the file: stapled from the next handshakes on.
    let next = dir.path().join("server.ocsp.new");
    pki.ocsp_response(true, &next)?;
    std::fs::rename(&next, &resp)?;
    eventually("the new response stapled", WAIT, || async {
        let said = handshake(lb.port).await.ok()?;
        said.contains("Cert Status: revoked").then_some(())
    })
    .await?;

    // Not an OCSP response: the reload fails, the last good one stays stapled.
    std::fs::write(&resp, "not DER")?;
    eventually("the failed reload counted", WAIT, || async {
        lb.log().contains("certificate reload failed").then_some(())
    })
    .await?;
    assert!(handshake(lb.port).await?.contains("Cert Status: revoked"));
    Ok(())
}
