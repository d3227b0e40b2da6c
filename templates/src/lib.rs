//! confd replacement: Tera templates rendered from the etcd catalog, written atomically,
//! checked, reloaded, rolled back on a failed reload.
//!
//! - [`config`]: `render.toml` and the template resources (`conf.d/*.toml`).
//! - [`engine`]: strict Tera, autoescape off, errors with positions.
//! - [`context`]: the template context, from one listing at one revision.
//! - [`weights`]: instance weight × version split → proxy server weights.
//! - [`files`]: atomic replacement of the destination.
//! - [`command`]: check/reload commands with a timeout that kills the process group.
//! - [`apply`]: one run of one resource (render, check, install, reload, rollback).
//! - [`trigger`]: the etcd watch that wakes resources on changes.
//! - [`runner`]: the daemon loop (debounce, SIGHUP re-read, `--onetime`).
//! - [`haproxy`]: a synchronous HAProxy reload through its master CLI.
//! - [`metrics`]: Prometheus metrics and the admin server.

pub mod apply;
pub mod command;
pub mod config;
pub mod context;
pub mod engine;
pub mod files;
pub mod haproxy;
pub mod metrics;
pub mod runner;
pub mod trigger;
pub mod weights;

pub use apply::{ApplyOptions, Outcome, RunError};
pub use config::{ConfigError, Resource, Settings, load_resources};
pub use metrics::Metrics;
pub use runner::{run, run_once};

/// Renders every resource's template against an empty catalog (each requested service
/// present with no instance): catches undefined variables that do not depend on data.
pub fn check_templates(resources: &[Resource]) -> Vec<String> {
    let data = context::CatalogData::default();
    resources
        .iter()
        .filter_map(|r| {
            r.template
                .render(&context::build(&data, r))
                .err()
                .map(|e| format!("{}: {e} (rendered with an empty catalog)", r.file.display()))
        })
        .collect()
}
