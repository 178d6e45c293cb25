//! The Vagrant VM of `vagrant/Vagrantfile`, built and tried on this machine.
//!
//! `cargo xtask vagrant-box` builds the box (public boxes cannot be fetched here);
//! `cargo xtask vagrant-test` brings the Vagrantfile up with agent and xtask built on the host
//! (the demo runs in the VM), replays the README's seed steps with `vagrant ssh -c`, and destroys
//! the VM. libvirt's daemons are started by hand where systemd is not PID 1, as here.

mod disk;
mod make_box;
mod steps;

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _};

use crate::{check, setup, sh};

const PACKAGES: &[&str] = &[
    "vagrant",
    "vagrant-libvirt",
    "libvirt-daemon-system",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
    "dnsmasq-base",
    "debootstrap",
    "fdisk",
    "e2fsprogs",
    "rsync",
    "binutils",
];

pub fn make_box() -> anyhow::Result<()> {
    prerequisites()?;
    make_box::build(&check::target_dir().join("vagrant/box"))?;
    eprintln!("vagrant-box: added {}", make_box::NAME);
    Ok(())
}

/// `make_box::build`'s child, in its own mount namespace.
pub fn box_disk(work: &Path) -> anyhow::Result<()> {
    make_box::rootfs_and_disk(work)
}

pub fn test(rebuild_box: bool, keep: bool, enforcer: Option<PathBuf>) -> anyhow::Result<()> {
    prerequisites()?;
    let work = check::target_dir().join("vagrant");
    if rebuild_box || !box_present()? {
        make_box::build(&work.join("box"))?;
    }
    let enforcer = match enforcer {
        Some(bin) => bin,
        None => check::build_release()?,
    };
    let prebuilt = stage_binaries(&enforcer, &work.join("prebuilt"))?;
    let vagrant = Vagrant {
        dir: sh::root().join("vagrant"),
        prebuilt,
        log: work.join("vagrant-test.log"),
        state: work.join("state"),
    };
    fs::write(&vagrant.log, "")?;
    // A VM an interrupted run left (this test's own: its state is apart from a user's
    // `vagrant up` in vagrant/, whose VM is never touched) would keep the name.
    vagrant.run(&["destroy", "-f"]).ok();
    let started = Instant::now();
    let result = vagrant
        .run(&["up", "--provider", "libvirt"])
        .context("vagrant up (the demo in the VM)")
        .and_then(|_| {
            eprintln!(
                "vagrant-test: up and the demo took {:.0} s",
                started.elapsed().as_secs_f64()
            );
            steps::run(&vagrant)
        });
    if !keep {
        if let Err(e) = vagrant.run(&["destroy", "-f"]) {
            eprintln!("vagrant-test: destroy failed: {e:#}");
        }
    }
    eprintln!("vagrant-test: log in {}", vagrant.log.display());
    result?;
    eprintln!(
        "vagrant-test: passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `vagrant` in vagrant/, with the settings this machine needs; every command's output is
/// streamed and kept in the log.
pub struct Vagrant {
    dir: PathBuf,
    prebuilt: PathBuf,
    log: PathBuf,
    /// Vagrant's record of the machine (VAGRANT_DOTFILE_PATH), instead of vagrant/.vagrant.
    state: PathBuf,
}

impl Vagrant {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("vagrant");
        cmd.current_dir(&self.dir)
            .args(args)
            .env("VAGRANT_DOTFILE_PATH", &self.state)
            .env("ENFORCER_BOX", make_box::NAME)
            .env("ENFORCER_PREBUILT", &self.prebuilt)
            // vagrant-libvirt's management network, as users get it: NAT to the host's uplink,
            // so that the VM reaches Debian's mirror and PyPI as the host does. Not on the
            // documentation ranges: the demo in the VM puts its test hosts there.
            .env_remove("ENFORCER_VAGRANT_NETWORK")
            // Its own domain name: a user's `vagrant up` in vagrant/ is `vagrant_enforcer`.
            .env("ENFORCER_VAGRANT_PREFIX", "enforcer-test_")
            .env("VAGRANT_LIBVIRT_DRIVER", libvirt_driver())
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<()> {
        let (ok, _) = self.capture(args)?;
        if !ok {
            bail!(
                "vagrant {} failed (see {})",
                args.join(" "),
                self.log.display()
            );
        }
        Ok(())
    }

    /// Runs `vagrant ARGS`, streaming its output to stderr and the log; returns whether it
    /// succeeded and what it printed (stdout, then stderr).
    pub fn capture(&self, args: &[&str]) -> anyhow::Result<(bool, String)> {
        let mut cmd = self.command(args);
        eprintln!("+ vagrant {}", args.join(" "));
        let mut log = fs::OpenOptions::new().append(true).open(&self.log)?;
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("vagrant")?;
        writeln!(log, "+ vagrant {}", args.join(" "))?;
        let stderr = child.stderr.take().context("vagrant's stderr")?;
        let err_log = log.try_clone()?;
        let errors = std::thread::spawn(move || copy_lines(stderr, err_log));
        let mut said = copy_lines(child.stdout.take().context("vagrant's stdout")?, log);
        said.push_str(&errors.join().unwrap_or_default());
        Ok((child.wait()?.success(), said))
    }
}

fn copy_lines(from: impl std::io::Read, mut log: fs::File) -> String {
    let mut kept = String::new();
    for line in BufReader::new(from).lines().map_while(Result::ok) {
        // `vagrant box add` redraws a progress line thousands of times: keep its last state.
        let line = line
            .rsplit('\r')
            .next()
            .unwrap_or_default()
            .replace("\x1b[K", "");
        eprintln!("  | {line}");
        let _ = writeln!(log, "{line}");
        kept.push_str(&line);
        kept.push('\n');
    }
    kept
}

/// kvm only where the CPU's virtualisation is there to use (this machine's /dev/kvm cannot run
/// an unmodified guest); qemu's emulation otherwise. /sys/module has built-in modules too.
fn libvirt_driver() -> &'static str {
    let hardware = ["kvm_intel", "kvm_amd"]
        .iter()
        .any(|m| Path::new("/sys/module").join(m).is_dir());
    if hardware {
        "kvm"
    } else {
        "qemu"
    }
}

/// The agent and this xtask, as the VM runs them, without their debug information.
fn stage_binaries(enforcer: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let xtask = std::env::current_exe().context("this xtask's path")?;
    fs::create_dir_all(dir)?;
    for (from, name) in [(enforcer, "enforcer"), (xtask.as_path(), "xtask")] {
        sh::run(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(from)
                .arg(dir.join(name)),
        )
        .with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(dir.to_path_buf())
}

fn box_present() -> anyhow::Result<bool> {
    let out = sh::output(Command::new("vagrant").args(["box", "list"]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(make_box::NAME)))
}

fn prerequisites() -> anyhow::Result<()> {
    if !sh::is_root() {
        bail!(
            "the box is built with loop devices and chroot, and libvirt runs as root: run as root"
        );
    }
    // qemu as vm-test installs it: bookworm's, or bookworm-backports' where qemu-utils is.
    crate::vm::prerequisites()?;
    // Without recommends: libvirt's would bring bookworm's qemu beside that one.
    setup::install_missing(PACKAGES, &["--no-install-recommends"], false)?;
    start_libvirt()
}

/// libvirtd as systemd would start it, or by hand where systemd is not PID 1.
fn start_libvirt() -> anyhow::Result<()> {
    let answers = || {
        sh::output(Command::new("virsh").args(["-c", "qemu:///system", "version"]))
            .is_ok_and(|o| o.status.success())
    };
    if answers() {
        return Ok(());
    }
    if Path::new("/run/systemd/system").is_dir() {
        sh::run(Command::new("systemctl").args(["start", "libvirtd", "virtlogd"]))?;
    } else {
        sh::run(Command::new("virtlogd").arg("-d"))?;
        sh::run(Command::new("libvirtd").arg("-d"))?;
    }
    for _ in 0..30 {
        if answers() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    bail!("libvirtd does not answer on qemu:///system")
}
