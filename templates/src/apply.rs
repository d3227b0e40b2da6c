//! One run of one template resource against one catalog listing:
//! render → compare → stage → check → backup → install → reload, and on a failed reload,
//! restore the previous file and reload again.
//!
//! The destination is touched only after the check passed, and only when its bytes (or its
//! mode/owner) differ from what was rendered.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{error, info, warn};

use crate::command;
use crate::config::Resource;
use crate::context::{self, CatalogData};
use crate::files::{self, FileMeta, Staged};
use crate::metrics::{Metrics, Stage};

/// What a successful run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The destination already held the rendered bytes.
    Unchanged,
    /// The destination was replaced (and reloaded, if a reload command is set).
    Written,
    /// `--noop`: the destination would have been replaced.
    WouldWrite,
}

/// A failed run: the stage it failed in and why.
#[derive(Debug, thiserror::Error)]
#[error("resource {resource}: {stage} failed: {message}")]
pub struct RunError {
    pub resource: String,
    pub stage: &'static str,
    pub message: String,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyOptions {
    /// Render and compare only: write nothing, run nothing.
    pub noop: bool,
}

/// Runs `resource` against `data`, updating the metrics.
pub async fn apply(
    resource: &Resource,
    data: &CatalogData,
    opts: ApplyOptions,
    metrics: &Metrics,
) -> Result<Outcome, RunError> {
    let result = run(resource, data, opts, metrics).await;
    match &result {
        Ok(outcome) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs_f64();
            metrics
                .last_success
                .with_label_values(&[&resource.name])
                .set(now);
            if *outcome == Outcome::Written {
                metrics.writes.with_label_values(&[&resource.name]).inc();
            }
        }
        Err(e) => {
            error!(resource = %resource.name, stage = e.stage, error = %e.message, "render run failed")
        }
    }
    result
}

async fn run(
    resource: &Resource,
    data: &CatalogData,
    opts: ApplyOptions,
    metrics: &Metrics,
) -> Result<Outcome, RunError> {
    let fail = |stage: Stage, message: String| {
        metrics.failed(&resource.name, stage);
        RunError {
            resource: resource.name.clone(),
            stage: stage.as_str(),
            message,
        }
    };
    let dest = &resource.dest;
    let ctx = context::build(data, resource);
    metrics.renders.with_label_values(&[&resource.name]).inc();
    let rendered = resource
        .template
        .render(&ctx)
        .map_err(|e| fail(Stage::Render, e.to_string()))?;
    let meta = FileMeta {
        mode: resource.mode,
        owner: resource.owner,
    };
    let current = files::read_current(dest)
        .map_err(|e| fail(Stage::Write, format!("reading {}: {e}", dest.display())))?;
    if current.as_deref() == Some(rendered.as_bytes())
        && files::meta_matches(dest, meta).unwrap_or(false)
    {
        return Ok(Outcome::Unchanged);
    }
    if opts.noop {
        info!(
            resource = %resource.name,
            dest = %dest.display(),
            old_bytes = current.as_ref().map_or(0, Vec::len),
            new_bytes = rendered.len(),
            revision = data.revision,
            "noop: destination would change"
        );
        return Ok(Outcome::WouldWrite);
    }

    let staged = Staged::write(dest, rendered.as_bytes(), meta)
        .map_err(|e| fail(Stage::Write, format!("staging {}: {e}", dest.display())))?;
    let dest_str = dest.to_string_lossy();
    if let Some(check) = &resource.check_cmd {
        let cmd = command::substitute(check, &staged.path().to_string_lossy(), &dest_str);
        // On failure `staged` is dropped and removed: the destination was never touched.
        command::run(&cmd, resource.command_timeout)
            .await
            .map_err(|e| fail(Stage::Check, e.to_string()))?;
    }
    if resource.backup
        && let Some(old) = &current
    {
        files::write_atomic(&files::backup_path(dest), old, meta)
            .map_err(|e| fail(Stage::Write, format!("writing the backup: {e}")))?;
    }
    staged
        .install()
        .map_err(|e| fail(Stage::Write, format!("installing {}: {e}", dest.display())))?;
    info!(resource = %resource.name, dest = %dest.display(), revision = data.revision, bytes = rendered.len(), "destination updated");

    let Some(reload) = &resource.reload_cmd else {
        return Ok(Outcome::Written);
    };
    let cmd = command::substitute(reload, &dest_str, &dest_str);
    let reload_err = match command::run(&cmd, resource.command_timeout).await {
        Ok(_) => {
            metrics.reloads.with_label_values(&[&resource.name]).inc();
            return Ok(Outcome::Written);
        }
        Err(e) => e,
    };
    metrics.failed(&resource.name, Stage::Reload);
    warn!(resource = %resource.name, error = %reload_err, "reload failed; restoring the previous file");
    let rollback = |message: String| {
        metrics.failed(&resource.name, Stage::Rollback);
        RunError {
            resource: resource.name.clone(),
            stage: Stage::Reload.as_str(),
            message: format!("{reload_err}; rollback failed: {message}"),
        }
    };
    match &current {
        Some(old) => {
            files::write_atomic(dest, old, meta)
                .map_err(|e| rollback(format!("restoring {}: {e}", dest.display())))?;
            metrics.rollbacks.with_label_values(&[&resource.name]).inc();
            command::run(&cmd, resource.command_timeout)
                .await
                .map_err(|e| rollback(format!("reloading the restored file: {e}")))?;
        }
        None => {
            // Nothing to go back to: leave no file the service could pick up later.
            files::remove(dest)
                .map_err(|e| rollback(format!("removing {}: {e}", dest.display())))?;
            metrics.rollbacks.with_label_values(&[&resource.name]).inc();
        }
    }
    Err(RunError {
        resource: resource.name.clone(),
        stage: Stage::Reload.as_str(),
        message: format!("{reload_err}; the previous file was restored and reloaded"),
    })
}
