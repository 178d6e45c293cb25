//! `cargo xtask vagrant-box`: a libvirt box of Debian 12, built from Debian's mirror because
//! public boxes cannot be fetched here. It follows the conventions of Debian's own
//! `debian/bookworm64` box: eth0 by DHCP through ifupdown, the `vagrant` user with Vagrant's
//! insecure key and password-less sudo, nothing else. It is upgraded from bookworm-updates and
//! bookworm-security as an installed Debian 12 is, kernel included; the security suite is also
//! where `cargo xtask setup` finds Rust and LLVM 22.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::{image, sh};

/// The box `vagrant/Vagrantfile` uses when `ENFORCER_BOX` names it.
pub const NAME: &str = "enforcer/bookworm";
/// The disk's virtual size: room for the toolchain and a release build inside the VM.
const DISK_GIB: u32 = 24;
const INCLUDE: &[&str] = &[
    "systemd-sysv",
    "linux-image-cloud-amd64",
    "grub-pc",
    "openssh-server",
    "sudo",
    "ifupdown",
    "isc-dhcp-client",
    "iproute2",
    "netbase",
    "rsync",
    "ca-certificates",
    "procps",
];
const INSECURE_KEY: &str =
    "/usr/share/rubygems-integration/all/gems/vagrant-2.3.4/keys/vagrant.pub";

pub fn build(work: &Path) -> anyhow::Result<PathBuf> {
    if work.exists() {
        // A run that was killed in a chroot leaves the host's /dev bound inside: removing the
        // directory first would delete the host's device nodes.
        unmount_under(work)?;
        fs::remove_dir_all(work).with_context(|| format!("removing {}", work.display()))?;
    }
    fs::create_dir_all(work)?;
    let rootfs = work.join("rootfs");
    sh::run(
        Command::new("debootstrap")
            .args([
                "--variant=minbase",
                &format!("--include={}", INCLUDE.join(",")),
            ])
            .arg("bookworm")
            .arg(&rootfs)
            .arg(image::MIRROR),
    )
    .context("debootstrap bookworm")?;
    configure(&rootfs)?;
    let raw = work.join("disk.raw");
    make_disk(&rootfs, &raw, &work.join("mnt"))?;
    fs::remove_dir_all(&rootfs)?;
    let img = work.join("box.img");
    sh::run(
        Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&raw)
            .arg(&img),
    )?;
    fs::remove_file(&raw)?;
    fs::write(
        work.join("metadata.json"),
        format!(r#"{{"provider":"libvirt","format":"qcow2","virtual_size":{DISK_GIB}}}"#),
    )?;
    fs::write(
        work.join("Vagrantfile"),
        "Vagrant.configure(\"2\") do |config|\nend\n",
    )?;
    let boxfile = work.join("enforcer-bookworm.box");
    sh::run(
        Command::new("tar")
            .current_dir(work)
            .arg("-cf")
            .arg(&boxfile)
            .args(["metadata.json", "Vagrantfile", "box.img"]),
    )?;
    fs::remove_file(&img)?;
    forget_uploaded_box()?;
    sh::run(
        Command::new("vagrant")
            .args(["box", "add", "--force", "--name", NAME])
            .arg(&boxfile),
    )?;
    fs::remove_file(&boxfile)?;
    Ok(boxfile)
}

/// vagrant-libvirt uploads a box into libvirt's pool once, under a name with the box's date; a
/// rebuilt box gets a new volume, and the old one would stay behind.
fn forget_uploaded_box() -> anyhow::Result<()> {
    let prefix = format!("{}_vagrant_box_image_", NAME.replace('/', "-VAGRANTSLASH-"));
    let out = sh::output(Command::new("virsh").args([
        "-c",
        "qemu:///system",
        "vol-list",
        "--pool",
        "default",
    ]))?;
    // No pool yet (libvirt fresh): nothing was uploaded.
    if !out.status.success() {
        return Ok(());
    }
    for volume in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with(&prefix))
    {
        sh::run(Command::new("virsh").args([
            "-c",
            "qemu:///system",
            "vol-delete",
            "--pool",
            "default",
            volume,
        ]))?;
    }
    Ok(())
}

/// Debian's image's apt sources, Vagrant's conventions, and bookworm-security's kernel.
fn configure(rootfs: &Path) -> anyhow::Result<()> {
    fs::remove_file(rootfs.join("etc/apt/sources.list")).ok();
    fs::write(
        rootfs.join("etc/apt/sources.list.d/debian.sources"),
        image::SOURCES,
    )?;
    image::trust_local_anchors(rootfs)?;
    fs::write(rootfs.join("etc/hostname"), "enforcer\n")?;
    fs::write(
        rootfs.join("etc/hosts"),
        "127.0.0.1 localhost\n127.0.1.1 enforcer\n::1 localhost ip6-localhost ip6-loopback\n",
    )?;
    fs::write(
        rootfs.join("etc/fstab"),
        "LABEL=root / ext4 errors=remount-ro 0 1\n",
    )?;
    fs::write(
        rootfs.join("etc/network/interfaces"),
        "auto lo\niface lo inet loopback\n\nallow-hotplug eth0\niface eth0 inet dhcp\n",
    )?;
    // The serial console for `virsh console` and the boot log; eth0, as Debian's box names it.
    fs::create_dir_all(rootfs.join("etc/default/grub.d"))?;
    fs::write(
        rootfs.join("etc/default/grub.d/enforcer.cfg"),
        "GRUB_TIMEOUT=1\n\
         GRUB_CMDLINE_LINUX=\"console=tty0 console=ttyS0,115200 net.ifnames=0 biosdevname=0\"\n",
    )?;
    fs::write(
        rootfs.join("etc/ssh/sshd_config.d/vagrant.conf"),
        "UseDNS no\n",
    )?;
    let sudoers = rootfs.join("etc/sudoers.d/vagrant");
    fs::write(&sudoers, "vagrant ALL=(ALL) NOPASSWD: ALL\n")?;
    fs::set_permissions(&sudoers, fs::Permissions::from_mode(0o440))?;

    let _mounts = ChrootMounts::new(rootfs)?;
    chroot(rootfs, &["useradd", "-m", "-s", "/bin/bash", "vagrant"])?;
    chroot(rootfs, &["sh", "-c", "echo vagrant:vagrant | chpasswd"])?;
    let ssh = rootfs.join("home/vagrant/.ssh");
    fs::create_dir_all(&ssh)?;
    fs::copy(INSECURE_KEY, ssh.join("authorized_keys"))
        .with_context(|| format!("Vagrant's insecure key {INSECURE_KEY}"))?;
    chroot(
        rootfs,
        &["chown", "-R", "vagrant:vagrant", "/home/vagrant/.ssh"],
    )?;
    chroot(rootfs, &["chmod", "700", "/home/vagrant/.ssh"])?;
    chroot(rootfs, &["update-ca-certificates"])?;
    chroot(rootfs, &["apt-get", "update", "-q"])?;
    chroot(rootfs, &["apt-get", "full-upgrade", "-y", "-q"])?;
    chroot(rootfs, &["apt-get", "clean"])?;
    Ok(())
}

fn chroot(rootfs: &Path, args: &[&str]) -> anyhow::Result<()> {
    sh::run(
        Command::new("chroot")
            .arg(rootfs)
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// A raw disk with one bootable ext4 partition labelled `root`, holding `rootfs`, with GRUB in
/// its MBR.
fn make_disk(rootfs: &Path, raw: &Path, mnt: &Path) -> anyhow::Result<()> {
    sh::run(
        Command::new("truncate")
            .args(["-s", &format!("{DISK_GIB}G")])
            .arg(raw),
    )?;
    let mut sfdisk = Command::new("sfdisk");
    sfdisk.arg(raw).stdin(std::process::Stdio::piped());
    eprintln!("+ sfdisk {}", raw.display());
    let mut child = sfdisk.spawn().context("sfdisk")?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().context("sfdisk's input")?;
        stdin.write_all(b"label: dos\ntype=83, bootable\n")?;
    }
    if !child.wait()?.success() {
        bail!("sfdisk {} failed", raw.display());
    }
    let loop_dev = LoopDevice::attach(raw)?;
    let part = format!("{}p1", loop_dev.path);
    sh::run(Command::new("mkfs.ext4").args(["-q", "-L", "root", &part]))?;
    fs::create_dir_all(mnt)?;
    let _root = Mount::new(&part, mnt, &[])?;
    sh::run(Command::new("cp").arg("-a").arg(rootfs.join(".")).arg(mnt))?;
    {
        let _mounts = ChrootMounts::new(mnt)?;
        chroot(mnt, &["grub-install", "--target=i386-pc", &loop_dev.path])?;
        chroot(mnt, &["update-grub"])?;
    }
    // Without udev, grub-mkconfig names the loop device: the VM's disk has the label instead.
    let cfg_path = mnt.join("boot/grub/grub.cfg");
    let cfg = fs::read_to_string(&cfg_path)?;
    let cfg = cfg.replace(&format!("root={part}"), "root=LABEL=root");
    if cfg.contains("/dev/loop") {
        bail!("{} still names a loop device", cfg_path.display());
    }
    fs::write(&cfg_path, cfg)?;
    Ok(())
}

/// Unmounts whatever is mounted under `dir`, deepest first, and fails if anything stays.
fn unmount_under(dir: &Path) -> anyhow::Result<()> {
    let dir = fs::canonicalize(dir)?;
    let mounted = || -> anyhow::Result<Vec<PathBuf>> {
        let info = fs::read_to_string("/proc/self/mountinfo")?;
        let mut points: Vec<PathBuf> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(PathBuf::from)
            .filter(|p| p.starts_with(&dir))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        Ok(points)
    };
    for point in mounted()? {
        let _ = Command::new("umount").arg("-l").arg(&point).status();
    }
    let left = mounted()?;
    if !left.is_empty() {
        bail!("still mounted under {}: {left:?}", dir.display());
    }
    Ok(())
}

/// A loop device over a disk image, with its partitions, detached when dropped.
struct LoopDevice {
    path: String,
}

impl LoopDevice {
    fn attach(image: &Path) -> anyhow::Result<Self> {
        let out = sh::output(Command::new("losetup").args(["-fP", "--show"]).arg(image))?;
        if !out.status.success() {
            bail!("losetup: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let dev = LoopDevice { path };
        // losetup -P does not always make the partition here; partx does (and fails, harmlessly,
        // when it exists).
        if !Path::new(&format!("{}p1", dev.path)).exists() {
            let _ = sh::output(Command::new("partx").args(["-a", &dev.path]));
        }
        if !Path::new(&format!("{}p1", dev.path)).exists() {
            bail!("{}p1 did not appear", dev.path);
        }
        Ok(dev)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.path]).status();
    }
}

/// A mount, undone when dropped.
struct Mount {
    target: PathBuf,
}

impl Mount {
    fn new(source: &str, target: &Path, options: &[&str]) -> anyhow::Result<Self> {
        fs::create_dir_all(target)?;
        sh::run(Command::new("mount").args(options).arg(source).arg(target))?;
        Ok(Mount {
            target: target.to_path_buf(),
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.target).status();
    }
}

/// /dev, /proc and /sys inside a chroot, for apt's maintainer scripts and grub-install.
struct ChrootMounts {
    _mounts: Vec<Mount>,
}

impl ChrootMounts {
    fn new(root: &Path) -> anyhow::Result<Self> {
        let mut mounts = vec![
            Mount::new("/dev", &root.join("dev"), &["--bind"])?,
            Mount::new("devpts", &root.join("dev/pts"), &["-t", "devpts"])?,
            Mount::new("proc", &root.join("proc"), &["-t", "proc"])?,
            Mount::new("sysfs", &root.join("sys"), &["-t", "sysfs"])?,
        ];
        // Dropped in reverse: dev/pts before dev.
        mounts.reverse();
        Ok(ChrootMounts { _mounts: mounts })
    }
}
