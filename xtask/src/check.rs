//! Build, lint and test.

use anyhow::Context as _;
use std::{path::PathBuf, process::Command};

use crate::sh;

pub fn build_release() -> anyhow::Result<PathBuf> {
    sh::run(
        Command::new("cargo")
            .args(["build", "--release", "--package", "enforcer-user"])
            .current_dir(sh::root()),
    )?;
    Ok(target_dir().join("release/enforcer"))
}

/// Cargo's target directory: `CARGO_TARGET_DIR` if set (relative to the workspace), else
/// `target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => sh::root().join(dir),
        _ => sh::root().join("target"),
    }
}

pub fn build_and_test() -> anyhow::Result<()> {
    let root = sh::root();
    let cargo = || {
        let mut c = Command::new("cargo");
        c.current_dir(&root);
        c
    };
    sh::run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    sh::run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // The kernel crate, linted on its real target by Debian's clippy (the one with rust-src).
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    sh::run(
        Command::new("/usr/bin/cargo")
            .current_dir(&root)
            .args([
                "clippy",
                "--package",
                "enforcer-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
            ])
            .args(["--target-dir", "target/bpf-clippy", "--", "-D", "warnings"])
            .env("PATH", path)
            .env("RUSTC", "/usr/bin/rustc")
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", "bpf-linker"),
    )?;
    crate::manifests::check(&root)?;
    crate::manifests::check_alerts(&root)?;
    if !sh::is_root() {
        eprintln!(
            "warning: not root: the privileged integration tests will fail with a clear reason"
        );
    }
    // Integration tests share the documentation address ranges, so they run one at a time.
    let (passed, failed) = run_tests(cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "enforcer-ebpf",
        "--",
        "--test-threads=1",
    ]))?;
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        anyhow::bail!("{failed} tests failed");
    }
    // The kernel matrix's smoke: Debian 12's own 6.1 kernel, the oldest supported, where the
    // verifier is strictest (a defect found there once). `cargo xtask vm-test` runs them all.
    crate::vm::run(
        &[crate::vm::SMOKE_KERNEL.to_string()],
        Some(target_dir().join("debug/enforcer")),
    )
    .context("the kernel matrix's smoke on 6.1 (cargo xtask vm-test)")?;
    // The image users build, run with the DaemonSet's exact privileges. After the kernel
    // tests, never beside them: their test hosts take documentation ranges, where this host
    // may reach its package mirrors.
    crate::image::build().context("cargo xtask image")?;
    crate::image_test::run().context("cargo xtask image-test")?;
    // The Vagrantfile as users run it (the demo in a Debian 12 VM, then the README's seed
    // steps), with the agent these tests built; after the kernel tests for the same reason.
    crate::vagrant::test(false, false, Some(target_dir().join("debug/enforcer")))
        .context("cargo xtask vagrant-test")?;
    Ok(())
}

/// Runs cargo test, echoing its output, and adds up the `test result:` lines of all binaries.
fn run_tests(cmd: &mut Command) -> anyhow::Result<(u64, u64)> {
    use std::io::BufRead as _;
    eprintln!("+ {}", sh::describe(cmd));
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn()?;
    let (mut passed, mut failed) = (0, 0);
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(summary) = line.strip_prefix("test result: ") {
                passed += count(summary, "passed");
                failed += count(summary, "failed");
            }
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        anyhow::bail!("cargo test failed with {status}");
    }
    Ok((passed, failed))
}

/// The number before `label` in `ok. 13 passed; 0 failed; ...`.
fn count(summary: &str, label: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| part.trim().strip_suffix(label))
        .and_then(|n| n.trim().rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_cargo_summaries() {
        let s =
            "ok. 13 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 25.87s";
        assert_eq!(super::count(s, "passed"), 13);
        assert_eq!(super::count(s, "failed"), 2);
        assert_eq!(
            super::count("FAILED. 1 passed; 1 failed; 0 ignored", "failed"),
            1
        );
    }
}
