//! Throwaway certificates for TLS tests, made with the `openssl` command (Debian `openssl`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed
/// by the CA, in a temporary directory that lives as long as this value.
pub struct TestPki {
    dir: TempDir,
}

impl TestPki {
    pub fn generate() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("wharf-pki-").tempdir()?;
        let d = dir.path();
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=wharf test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
            ],
        )?;
        for (name, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth",
            ),
            ("client", "extendedKeyUsage=clientAuth"),
        ] {
            std::fs::write(d.join(format!("{name}.ext")), ext)?;
            openssl(
                d,
                &[
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-subj",
                    &format!("/CN=wharf test {name}"),
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                ],
            )?;
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    &format!("{name}.ext"),
                    "-out",
                    &format!("{name}.crt"),
                ],
            )?;
        }
        Ok(Self { dir })
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Writes a CRL of the CA (PEM) to `out`, listing the client certificate if
    /// `revoke_client`.
    pub fn crl(&self, revoke_client: bool, out: &Path) -> Result<()> {
        self.gencrl(revoke_client, &[], out)
    }

    /// Writes a CRL of the CA (PEM) to `out` that revokes nothing and whose nextUpdate
    /// passed long ago (2020).
    pub fn expired_crl(&self, out: &Path) -> Result<()> {
        let dates = [
            "-crl_lastupdate",
            "20200101000000Z",
            "-crl_nextupdate",
            "20200102000000Z",
        ];
        self.gencrl(false, &dates, out)
    }

    fn gencrl(&self, revoke_client: bool, extra: &[&str], out: &Path) -> Result<()> {
        let db = self.ca_db(revoke_client.then_some("client.crt"))?;
        let (ca, key) = (self.arg("ca.crt"), self.arg("ca.key"));
        let out = out.display().to_string();
        let args = ["ca", "-config", "ca.cnf", "-keyfile", &key, "-cert", &ca];
        let output = ["-gencrl", "-out", &out];
        openssl(db.path(), &[&args[..], extra, &output[..]].concat())
    }

    /// Writes a DER OCSP response for the server certificate, signed by the CA, to `out`:
    /// status `unknown`, or `revoked`.
    pub fn ocsp_response(&self, revoked: bool, out: &Path) -> Result<()> {
        let db = self.ca_db(revoked.then_some("server.crt"))?;
        let (ca, key, cert) = (
            self.arg("ca.crt"),
            self.arg("ca.key"),
            self.arg("server.crt"),
        );
        let out = out.display().to_string();
        openssl(
            db.path(),
            &[
                "ocsp",
                "-index",
                "index.txt",
                "-rsigner",
                &ca,
                "-rkey",
                &key,
                "-CA",
                &ca,
                "-issuer",
                &ca,
                "-cert",
                &cert,
                "-respout",
                &out,
                "-ndays",
                "1",
            ],
        )
    }

    /// An `openssl ca` database of the CA in a temporary directory, with `revoked` (a
    /// certificate file of this PKI) marked revoked.
    fn ca_db(&self, revoked: Option<&str>) -> Result<TempDir> {
        let db = tempfile::Builder::new().prefix("wharf-ca-db-").tempdir()?;
        std::fs::write(db.path().join("index.txt"), "")?;
        std::fs::write(db.path().join("crlnumber"), "01\n")?;
        std::fs::write(
            db.path().join("ca.cnf"),
            "[ca]\ndefault_ca = x\n[x]\ndatabase = index.txt\ncrlnumber = crlnumber\n\
             default_md = sha256\ndefault_crl_days = 2\n",
        )?;
        if let Some(file) = revoked {
            let (ca, key, cert) = (self.arg("ca.crt"), self.arg("ca.key"), self.arg(file));
            let args = ["ca", "-config", "ca.cnf", "-keyfile", &key, "-cert", &ca];
            openssl(db.path(), &[&args[..], &["-revoke", &cert]].concat())?;
        }
        Ok(db)
    }

    fn arg(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl (apt-get install openssl)")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
