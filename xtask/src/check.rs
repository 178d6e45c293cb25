//! Build, lint and test.

use std::{path::PathBuf, process::Command};

use crate::sh;

pub fn build_release() -> anyhow::Result<PathBuf> {
    sh::run(
        Command::new("cargo")
            .args(["build", "--release", "--package", "enforcer-user"])
            .current_dir(sh::root()),
    )?;
    Ok(sh::root().join("target/release/enforcer"))
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
    if !sh::is_root() {
        eprintln!(
            "warning: not root: the privileged integration tests will fail with a clear reason"
        );
    }
    // Integration tests share the documentation address ranges, so they run one at a time.
    sh::run(cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "enforcer-ebpf",
        "--",
        "--test-threads=1",
    ]))?;
    Ok(())
}
