//! `cargo xtask image`: the agent's OCI image, built with podman from `deploy/Dockerfile` as a
//! user builds it, with no registry but Debian's mirror. The Dockerfile's bases
//! (`debian:bookworm`, `debian:bookworm-slim`) are made here with debootstrap and imported
//! under the names the Dockerfile starts from.

use std::{path::Path, process::Command};

use anyhow::Context as _;

use crate::sh;

/// The image's name, as deploy/agent/kustomization.yaml names it.
pub const TAG: &str = "ghcr.io/enforcer/enforcer:0.1.0";
const BASES: [&str; 2] = [
    "docker.io/library/debian:bookworm",
    "docker.io/library/debian:bookworm-slim",
];
const PACKAGES: [&str; 3] = ["podman", "runc", "debootstrap"];
pub const MIRROR: &str = "http://deb.debian.org/debian";

/// Debian's image has the security suite, where the Dockerfile's Rust and LLVM 22 come from.
pub const SOURCES: &str = "Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

/// podman as this kind of host needs it: runc (crun refuses a hybrid cgroup layout), cgroupfs
/// (no systemd as PID 1).
pub fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    cmd
}

/// Limits podman sets by default and runc cannot raise here (root lacks CAP_SYS_RESOURCE).
pub const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=4096:4096",
    "--ulimit",
    "nproc=4096:4096",
];

pub fn build() -> anyhow::Result<()> {
    let root = sh::root();
    crate::setup::install_missing(&PACKAGES, &[], false)?;
    base(&root.join("target/image"))?;
    sh::run(
        podman()
            .current_dir(&root)
            .args(["build", "--network", "host", "--pull=never"])
            .args(ULIMITS)
            .args(["-f", "deploy/Dockerfile", "-t", TAG, "."]),
    )
    .context("podman build -f deploy/Dockerfile")?;
    eprintln!("image: {TAG}");
    Ok(())
}

/// This host's own trust anchors (a proxy's, where registries are reached through one), as
/// `update-ca-certificates` finds them when the Dockerfile installs ca-certificates: the build
/// then reaches crates.io as the host does. Where there are none, the base is Debian's alone.
pub fn trust_local_anchors(rootfs: &Path) -> anyhow::Result<()> {
    let local = Path::new("/usr/local/share/ca-certificates");
    let Ok(entries) = std::fs::read_dir(local) else {
        return Ok(());
    };
    let into = rootfs.join("usr/local/share/ca-certificates");
    std::fs::create_dir_all(&into)?;
    for entry in entries.flatten() {
        if entry.path().extension().is_some_and(|e| e == "crt") {
            std::fs::copy(entry.path(), into.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// The bases, unless podman has them: a minbase bookworm with Debian's image's apt sources.
fn base(work: &Path) -> anyhow::Result<()> {
    let present = |name: &str| {
        podman()
            .args(["image", "exists", name])
            .status()
            .is_ok_and(|s| s.success())
    };
    if BASES.iter().all(|b| present(b)) {
        return Ok(());
    }
    let rootfs = work.join("rootfs");
    if rootfs.exists() {
        std::fs::remove_dir_all(&rootfs)?;
    }
    std::fs::create_dir_all(work)?;
    sh::run(
        Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(&rootfs)
            .arg(MIRROR),
    )
    .context("debootstrap bookworm")?;
    std::fs::remove_file(rootfs.join("etc/apt/sources.list")).ok();
    trust_local_anchors(&rootfs)?;
    std::fs::write(
        rootfs.join("etc/apt/sources.list.d/debian.sources"),
        SOURCES,
    )?;
    // No apt lists or caches in the image: the Dockerfile updates first, as on Debian's.
    for dir in ["var/lib/apt/lists", "var/cache/apt/archives"] {
        for entry in std::fs::read_dir(rootfs.join(dir))?.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                std::fs::remove_file(entry.path())?;
            }
        }
    }
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .args(["-c", "."])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("tar")?;
    let stdout = tar.stdout.context("tar's output")?;
    sh::run(
        podman()
            .args(["import", "-", BASES[0]])
            .stdin(std::process::Stdio::from(stdout)),
    )
    .context("podman import")?;
    sh::run(podman().args(["tag", BASES[0], BASES[1]]))?;
    std::fs::remove_dir_all(&rootfs)?;
    Ok(())
}
