//! Builds the kernel programs (`enforcer-ebpf`) for `bpfel-unknown-none` and hands the object to
//! `src/datapath` through `ENFORCER_BPF_OBJECT`, so the `enforcer` binary embeds it.
//!
//! The BPF target needs `-Z build-std=core`, so a toolchain with its library source is required:
//! Debian's rustc (`/usr/bin/rustc` with `/usr/lib/rustlib/src`) or a rustup nightly with
//! `rust-src`. `cargo xtask setup` installs the former.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir.parent().expect("workspace root").to_path_buf();
    for dir in ["enforcer-ebpf/src", "enforcer-common/src"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("enforcer-ebpf/Cargo.toml").display()
    );
    println!("cargo:rerun-if-env-changed=ENFORCER_BPF_TOOLCHAIN");

    let target_dir = root.join("target").join("bpf");
    let object = target_dir.join("bpfel-unknown-none/release/enforcer");

    let Some(mut cmd) = bpf_cargo() else {
        panic!(
            "no toolchain that can build the BPF target was found (need Debian's rustc with \
             rust-web-src, or a rustup nightly with rust-src, plus bpf-linker). \
             Run `cargo xtask setup`."
        );
    };
    // The outer cargo's settings (wrappers, flags, jobserver) must not leak into the inner build.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if (key.starts_with("CARGO") && key != "CARGO_HOME")
            || key.starts_with("RUSTC")
            || key == "RUSTFLAGS"
            || key == "RUSTDOC"
        {
            cmd.env_remove(&key);
        }
    }
    cmd.current_dir(&root)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", "bpf-linker")
        .args([
            "build",
            "--package",
            "enforcer-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir);
    if let Some(rustc) = debian_rustc() {
        cmd.env("RUSTC", rustc);
    }
    let status = cmd
        .status()
        .expect("failed to run cargo for the BPF target");
    assert!(
        status.success(),
        "building enforcer-ebpf failed; see the output above"
    );
    assert!(
        object.exists(),
        "the BPF object {} was not produced",
        object.display()
    );
    println!("cargo:rustc-env=ENFORCER_BPF_OBJECT={}", object.display());
}

fn debian_rustc() -> Option<PathBuf> {
    let rustc = Path::new("/usr/bin/rustc");
    let src = Path::new("/usr/lib/rustlib/src/rust/library/core");
    let wanted = env::var("ENFORCER_BPF_TOOLCHAIN").unwrap_or_default();
    (wanted.is_empty() || wanted == "debian")
        .then_some(())
        .filter(|()| rustc.exists() && src.exists())
        .map(|()| rustc.to_path_buf())
}

fn bpf_cargo() -> Option<Command> {
    if debian_rustc().is_some() && Path::new("/usr/bin/cargo").exists() {
        return Some(Command::new("/usr/bin/cargo"));
    }
    // A rustup nightly with rust-src works as well.
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|out| out.status.success())?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    sysroot
        .join("lib/rustlib/src/rust/library/core")
        .exists()
        .then(|| {
            let mut cmd = Command::new("rustup");
            cmd.args(["run", "nightly", "cargo"]);
            cmd
        })
}
