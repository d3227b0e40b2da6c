//! The dependency rule of DESIGN.md, checked on the real workspace: `catalog` depends on no
//! other part, and the four parts depend on `catalog` but never on each other.

use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

const CATALOG: &str = "wharf-catalog";
const PARTS: [&str; 4] = [
    "wharf-balancer",
    "wharf-healthcheck",
    "wharf-registrar",
    "wharf-templates",
];

fn metadata() -> Result<Value> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Names of the workspace packages that `package` uses outside its tests (normal and build
/// dependencies; dev-dependencies may pull in the test kit).
fn runtime_deps<'a>(meta: &'a Value, package: &str) -> Result<Vec<&'a str>> {
    let pkg = meta["packages"]
        .as_array()
        .context("packages")?
        .iter()
        .find(|p| p["name"] == package)
        .with_context(|| format!("{package} is not in the workspace"))?;
    Ok(pkg["dependencies"]
        .as_array()
        .context("dependencies")?
        .iter()
        .filter(|d| d["kind"] != "dev")
        .filter_map(|d| d["name"].as_str())
        .filter(|n| n.starts_with("wharf-"))
        .collect())
}

#[test]
fn parts_depend_only_on_catalog() -> Result<()> {
    let meta = metadata()?;
    assert_eq!(
        runtime_deps(&meta, CATALOG)?,
        Vec::<&str>::new(),
        "catalog stands alone"
    );
    for part in PARTS {
        let deps = runtime_deps(&meta, part)?;
        assert_eq!(deps, vec![CATALOG], "{part} may depend on {CATALOG} only");
    }
    Ok(())
}

#[test]
fn the_rule_would_catch_a_violation() -> Result<()> {
    // Guard against a check that passes vacuously: the metadata really lists dependencies.
    let meta = metadata()?;
    let deps = runtime_deps(&meta, "wharf-bench")?;
    assert!(
        deps.contains(&"wharf-tests"),
        "bench uses the test kit: {deps:?}"
    );
    Ok(())
}
