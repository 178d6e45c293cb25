//! `cargo xtask vm-test`: the agent on Debian kernels other than the host's, in qemu.
//!
//! For each kernel package: `apt-get download` the `.deb` (never installed on the host), unpack it
//! with `dpkg-deb -x`, build an initramfs from busybox-static, the host's `ip`, `tc` and `bpftool`,
//! the enforcer binary (each with its shared libraries), the kernel's `dummy`, `veth`,
//! `sch_ingress` and `cls_bpf` modules and `vm/init`, then boot it under TCG with a hard timeout.
//! The guest prints `RESULT <name> PASS|FAIL <detail>` lines on its serial console; the whole
//! console is kept in `target/vm/<package>/serial.log`.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::sh;

const INIT: &str = include_str!("../vm/init");

/// Debian 12's own kernel, the newest 6.1 (bookworm-security) and 6.12 (bookworm-security).
pub const DEFAULT_KERNELS: &[&str] = &[
    "linux-image-6.1.0-50-cloud-amd64",
    "linux-image-cloud-amd64",
    "linux-image-6.12-cloud-amd64",
];
/// The kernel `cargo xtask build-and-test` boots: Debian 12's own.
pub const SMOKE_KERNEL: &str = "linux-image-6.1.0-50-cloud-amd64";
const MODULES: &[&str] = &["dummy", "veth", "sch_ingress", "cls_bpf"];
const HOST_TOOLS: &[&str] = &["ip", "tc", "bpftool", "dnsmasq"];
const PACKAGES: &[&str] = &[
    "busybox-static",
    "cpio",
    "xz-utils",
    "iproute2",
    "bpftool",
    "dnsmasq-base",
];
const TIMEOUT: Duration = Duration::from_secs(240);

struct Outcome {
    package: String,
    version: String,
    passed: usize,
    failed: usize,
    secs: f64,
    results: Vec<CheckResult>,
}

pub fn run(kernels: &[String], enforcer: Option<PathBuf>) -> anyhow::Result<()> {
    let root = sh::root();
    let enforcer = enforcer.unwrap_or_else(|| root.join("target/release/enforcer"));
    if !enforcer.is_file() {
        bail!(
            "{} does not exist: run `cargo xtask build` or pass --enforcer",
            enforcer.display()
        );
    }
    let enforcer = fs::canonicalize(&enforcer)?;
    prerequisites()?;
    let kernels: Vec<String> = if kernels.is_empty() {
        DEFAULT_KERNELS.iter().map(|k| k.to_string()).collect()
    } else {
        kernels.to_vec()
    };
    let out = root.join("target/vm");
    let started = Instant::now();
    let mut outcomes = Vec::new();
    for kernel in &kernels {
        let outcome =
            one_kernel(kernel, &enforcer, &out).with_context(|| format!("kernel {kernel}"))?;
        outcomes.push(outcome);
    }
    println!("\nvm-test with {}:", enforcer.display());
    for o in &outcomes {
        println!(
            "{} ({}): {} passed, {} failed, {:.0} s",
            o.package, o.version, o.passed, o.failed, o.secs
        );
        for r in o.results.iter().filter(|r| !r.pass) {
            println!("  {}", r.line);
        }
    }
    println!("all kernels: {:.0} s", started.elapsed().as_secs_f64());
    let bad = outcomes.iter().filter(|o| o.failed > 0).count();
    if bad > 0 {
        bail!("{bad} of {} kernels failed", outcomes.len());
    }
    Ok(())
}

/// Installs the Debian packages the initramfs is made of, and qemu, when missing.
pub fn prerequisites() -> anyhow::Result<()> {
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !crate::setup::installed(p))
        .collect();
    // bookworm's qemu 7.2 conflicts with a qemu-utils from bookworm-backports.
    let backports = version_of("qemu-utils").is_some_and(|v| v.contains("bpo"));
    let qemu = Path::new("/usr/bin/qemu-system-x86_64").exists();
    if missing.is_empty() && qemu {
        return Ok(());
    }
    if !sh::is_root() {
        bail!(
            "missing packages ({}{}): run as root once",
            missing.join(" "),
            if qemu { "" } else { " qemu-system-x86" }
        );
    }
    sh::run(Command::new("apt-get").args(["update", "-q"]))?;
    let install = |target: Option<&str>, packages: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "-q", "--no-install-recommends"]);
        if let Some(t) = target {
            cmd.args(["-t", t]);
        }
        sh::run(cmd.args(packages).env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if !qemu {
        if backports {
            install(Some("bookworm-backports"), &["qemu-system-x86"]).context(
                "qemu-utils is from bookworm-backports, so qemu-system-x86 must be too: add a \
                 bookworm-backports source to /etc/apt/sources.list.d/",
            )?;
        } else {
            missing.push("qemu-system-x86");
        }
    }
    if !missing.is_empty() {
        install(None, &missing)?;
    }
    Ok(())
}

fn version_of(package: &str) -> Option<String> {
    let o =
        sh::output(Command::new("dpkg-query").args(["-W", "-f", "${Version}", package])).ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn one_kernel(requested: &str, enforcer: &Path, out: &Path) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let (package, version) = resolve(requested)?;
    eprintln!("\n=== {requested}: {package} {version}");
    let dir = out.join(&package);
    fs::create_dir_all(&dir)?;
    let deb = download(&package, &version, &dir.join("deb"))?;

    let extracted = dir.join("extracted");
    remove_dir(&extracted)?;
    sh::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extracted))?;
    let files = walk(&extracted)?;
    let vmlinuz = files
        .iter()
        .find(|f| file_name(f).starts_with("vmlinuz-"))
        .with_context(|| format!("no boot/vmlinuz-* in {}", deb.display()))?;
    fs::copy(vmlinuz, dir.join("vmlinuz"))?;

    let initramfs = dir.join("initramfs.cpio");
    make_initramfs(&dir.join("rootfs"), &files, enforcer, &initramfs)?;
    remove_dir(&extracted)?;
    remove_dir(&dir.join("rootfs"))?;

    let log = dir.join("serial.log");
    let results = boot(&dir.join("vmlinuz"), &initramfs, &log)?;
    let passed = results.iter().filter(|r| r.pass).count();
    let failed = results.len() - passed;
    Ok(Outcome {
        package,
        version,
        passed,
        failed,
        secs: started.elapsed().as_secs_f64(),
        results,
    })
}

/// The image package and its candidate version; a meta-package is followed to the image it
/// depends on (`linux-image-6.12-cloud-amd64` → `linux-image-6.12.117+deb12-cloud-amd64`).
fn resolve(package: &str) -> anyhow::Result<(String, String)> {
    let mut package = package.to_string();
    for _ in 0..4 {
        let o =
            sh::output(Command::new("apt-cache").args(["show", "--no-all-versions", &package]))?;
        let text = String::from_utf8_lossy(&o.stdout);
        if !o.status.success() || text.trim().is_empty() {
            bail!("apt-cache knows no package {package} (run apt-get update?)");
        }
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        let version = field("Version:").context("no Version field")?;
        let image_dep = field("Depends:").and_then(|deps| {
            deps.split(',')
                .map(|d| d.split_whitespace().next().unwrap_or_default().to_string())
                .find(|d| d.starts_with("linux-image-"))
        });
        match image_dep {
            Some(next) => package = next,
            None => return Ok((package, version)),
        }
    }
    bail!("{package}: too many meta-packages")
}

/// `apt-get download`s the package into `dir`, unless that version is already there.
fn download(package: &str, version: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let name = format!("{package}_{}_amd64.deb", version.replace(':', "%3a"));
    let deb = dir.join(&name);
    if deb.is_file() {
        eprintln!("{name}: already downloaded");
        return Ok(deb);
    }
    sh::run(
        Command::new("apt-get")
            .args(["download", "-q"])
            .arg(format!("{package}={version}"))
            .current_dir(dir),
    )?;
    if !deb.is_file() {
        bail!("apt-get download did not leave {}", deb.display());
    }
    Ok(deb)
}

fn make_initramfs(
    rootfs: &Path,
    kernel_files: &[PathBuf],
    enforcer: &Path,
    out: &Path,
) -> anyhow::Result<()> {
    remove_dir(rootfs)?;
    for d in [
        "bin",
        "dev",
        "etc",
        "proc",
        "sys",
        "run",
        "tmp",
        "root",
        "modules",
        "usr/local/bin",
    ] {
        fs::create_dir_all(rootfs.join(d))?;
    }
    install_file(
        Path::new("/bin/busybox"),
        &rootfs.join("bin/busybox"),
        0o755,
    )?;
    let init = rootfs.join("init");
    fs::write(&init, INIT)?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;

    let mut binaries: Vec<PathBuf> = Vec::new();
    for tool in HOST_TOOLS {
        binaries.push(which(tool)?);
    }
    binaries.push(enforcer.to_path_buf());
    for bin in &binaries {
        if bin == enforcer {
            // Without its debug information: a debug build is 280 MB, the guest has 1 GiB.
            let dest = rootfs.join("usr/local/bin/enforcer");
            sh::run(
                Command::new("strip")
                    .arg("--strip-debug")
                    .arg(bin)
                    .arg("-o")
                    .arg(&dest),
            )
            .context("strip (binutils)")?;
        } else {
            install_file(
                bin,
                &rootfs.join("usr/local/bin").join(file_name(bin)),
                0o755,
            )?;
        }
        for lib in shared_libraries(bin)? {
            let rel = lib.strip_prefix("/").unwrap_or(&lib);
            install_file(&lib, &rootfs.join(rel), 0o755)?;
        }
    }

    for module in MODULES {
        let found = kernel_files.iter().find(|f| {
            let n = file_name(f);
            n == format!("{module}.ko") || n.starts_with(&format!("{module}.ko."))
        });
        let Some(found) = found else {
            eprintln!("module {module}: not in the package (built in, or absent)");
            continue;
        };
        let dest = rootfs.join("modules").join(format!("{module}.ko"));
        let decompress = match found.extension().and_then(|e| e.to_str()) {
            Some("xz") => Some("xz"),
            Some("zst") => Some("zstd"),
            Some("gz") => Some("gzip"),
            _ => None,
        };
        match decompress {
            None => install_file(found, &dest, 0o644)?,
            Some(tool) => {
                let o = sh::output(Command::new(tool).arg("-dc").arg(found))?;
                if !o.status.success() {
                    bail!("{tool} -dc {} failed", found.display());
                }
                fs::write(&dest, o.stdout)?;
            }
        }
    }

    // newc archive, every entry owned by root; directories come before their contents.
    let mut entries = vec![PathBuf::from(".")];
    entries.extend(
        walk(rootfs)?
            .into_iter()
            .filter_map(|p| p.strip_prefix(rootfs).ok().map(|r| Path::new(".").join(r))),
    );
    let list: String = entries
        .iter()
        .map(|p| format!("{}\n", p.display()))
        .collect();
    let file = fs::File::create(out)?;
    let mut cpio = Command::new("cpio")
        .args(["--quiet", "-o", "-H", "newc", "-R", "0:0"])
        .current_dir(rootfs)
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .context("running cpio")?;
    cpio.stdin
        .take()
        .context("cpio stdin")?
        .write_all(list.as_bytes())?;
    let status = cpio.wait()?;
    if !status.success() {
        bail!("cpio failed with {status}");
    }
    eprintln!(
        "initramfs: {} ({} MB, {} entries)",
        out.display(),
        fs::metadata(out)?.len() / 1_000_000,
        entries.len()
    );
    Ok(())
}

struct CheckResult {
    pass: bool,
    line: String,
}

/// Boots the guest, copies its console to `log` (and RESULT lines to stderr) and returns the
/// checks. A guest that does not reach `VMTEST-END` in time counts as one more failure.
fn boot(vmlinuz: &Path, initramfs: &Path, log: &Path) -> anyhow::Result<Vec<CheckResult>> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "1024",
    ])
    .arg("-kernel")
    .arg(vmlinuz)
    .arg("-initrd")
    .arg(initramfs)
    .args([
        "-append",
        "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init",
        "-nic",
        "none",
        "-nographic",
        "-no-reboot",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    eprintln!("+ {}", sh::describe(&cmd));
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().context("qemu stdout")?;
    let stderr = child.stderr.take().context("qemu stderr")?;
    let tx2 = tx.clone();
    std::thread::spawn(move || forward_lines(stdout, tx));
    std::thread::spawn(move || forward_lines(stderr, tx2));

    let mut file = fs::File::create(log)?;
    let mut results = Vec::new();
    let mut ended = false;
    let mut timed_out = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                writeln!(file, "{line}")?;
                if let Some(at) = line.find("RESULT ") {
                    let result = &line[at..];
                    eprintln!("{result}");
                    let mut words = result.split_whitespace().skip(2);
                    results.push(CheckResult {
                        pass: words.next() == Some("PASS"),
                        line: result.to_string(),
                    });
                } else if line.contains("VMTEST-END") {
                    ended = true;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if !timed_out && started.elapsed() > TIMEOUT {
            timed_out = true;
            // qemu's pipes close when it dies, which ends the loop.
            child.kill().ok();
        }
    }
    let status = child.wait()?;
    let secs = started.elapsed().as_secs_f64();
    if timed_out {
        let line = format!(
            "RESULT guest_finished FAIL killed after {} s without VMTEST-END",
            TIMEOUT.as_secs()
        );
        writeln!(file, "{line}")?;
        eprintln!("{line}");
        results.push(CheckResult { pass: false, line });
    } else if !ended {
        let line = format!("RESULT guest_finished FAIL qemu exited ({status}) before VMTEST-END");
        writeln!(file, "{line}")?;
        eprintln!("{line}");
        results.push(CheckResult { pass: false, line });
    }
    if results.is_empty() {
        let line = "RESULT guest_results FAIL the guest printed no RESULT line".to_string();
        eprintln!("{line}");
        results.push(CheckResult { pass: false, line });
    }
    eprintln!("guest ran {secs:.1} s; console in {}", log.display());
    Ok(results)
}

fn forward_lines(from: impl std::io::Read, to: mpsc::Sender<String>) {
    let mut reader = BufReader::new(from);
    let mut buf = Vec::new();
    while let Ok(n) = reader.read_until(b'\n', &mut buf) {
        if n == 0 {
            break;
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\n', '\r']).replace('\r', "");
        if to.send(line).is_err() {
            break;
        }
        buf.clear();
    }
}

/// The shared libraries `ldd` names for `bin`, the dynamic loader among them.
fn shared_libraries(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let o = sh::output(Command::new("ldd").arg(bin))?;
    let text = String::from_utf8_lossy(&o.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

fn which(tool: &str) -> anyhow::Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = Path::new(dir).join(tool);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{tool} not found on the host")
}

/// Copies `from` (following symlinks) to `to`, creating the parent directories.
fn install_file(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Every file and directory under `dir`, parents before children (symlinks are not followed).
fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let is_dir = entry.file_type()?.is_dir();
        out.push(path.clone());
        if is_dir {
            out.extend(walk(&path)?);
        }
    }
    Ok(out)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn remove_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}
