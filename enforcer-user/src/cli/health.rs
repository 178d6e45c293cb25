use std::{path::PathBuf, time::Duration};

use clap::Args;

#[derive(Args, Debug)]
pub struct HealthArgs {
    /// The agent's status file.
    #[arg(long, value_name = "FILE", default_value = crate::observe::status::DEFAULT_PATH)]
    status_file: PathBuf,
    /// Unhealthy when the agent has not touched its status file for this long, in seconds (it
    /// does every second).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    max_age: u64,
    /// Only whether the loop runs, not whether its applies succeed: for liveness, since a
    /// restart does not cure a full map (readiness leaves this off).
    #[arg(long)]
    loop_only: bool,
}

/// Exit 0 when the agent has applied a policy, its loop is running, and its applies have not
/// kept failing for longer than `--max-age`; for liveness and readiness probes, which need no
/// port on the node.
pub fn health(args: HealthArgs) -> anyhow::Result<i32> {
    if let Some(why) = failing_too_long(&args).filter(|_| !args.loop_only) {
        eprintln!("unhealthy: {why}");
        return Ok(1);
    }
    let age = std::fs::metadata(&args.status_file)
        .and_then(|m| m.modified())
        .map(|t| t.elapsed().unwrap_or_default());
    match age {
        Ok(age) if age <= Duration::from_secs(args.max_age) => Ok(0),
        Ok(age) => {
            eprintln!(
                "unhealthy: {} was last touched {}s ago",
                args.status_file.display(),
                age.as_secs()
            );
            Ok(1)
        }
        Err(err) => {
            eprintln!(
                "not ready: {}: {err} (no policy applied yet)",
                args.status_file.display()
            );
            Ok(1)
        }
    }
}

/// Why the agent is unhealthy although it runs: every apply since some time left entries out.
fn failing_too_long(args: &HealthArgs) -> Option<String> {
    let status = crate::observe::status::Status::read(&args.status_file).ok()?;
    let since = status.failing_since?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    let failing = now.saturating_sub(since);
    (failing > args.max_age).then(|| {
        format!(
            "applies have failed for {failing}s; the last: {}",
            status
                .apply_errors
                .first()
                .map_or("(none recorded)", String::as_str)
        )
    })
}
