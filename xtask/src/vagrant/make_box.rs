//! `cargo xtask vagrant-box`: a libvirt box of Debian 12, built from Debian's mirror because
//! public boxes cannot be fetched here. It follows the conventions of Debian's own
//! `debian/bookworm64` box: eth0 by DHCP through ifupdown, the `vagrant` user with Vagrant's
//! insecure key and password-less sudo. It is upgraded from bookworm-updates and
//! bookworm-security as an installed Debian 12 is, kernel included; the security suite is also
//! where `cargo xtask setup` finds Rust and LLVM 22. Like the image's bases, it trusts the
//! host's local anchors (`/usr/local/share/ca-certificates`, a proxy's where registries are
//! reached through one; empty on a normal machine). It ships no SSH host keys and no machine
//! id: each VM makes its own at first boot.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use super::disk;
use crate::{image, sh};

/// The box `vagrant/Vagrantfile` uses when `ENFORCER_BOX` names it.
pub const NAME: &str = "enforcer/bookworm";
/// The disk's virtual size: room for the toolchain and a release build inside the VM.
pub const DISK_GIB: u32 = 24;
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
/// `ssh-keygen -A` before sshd, where the box left no host keys.
const HOST_KEYS_UNIT: &str = "[Unit]
Description=This machine's SSH host keys (the box ships none)
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=ssh.service
";

pub fn build(work: &Path) -> anyhow::Result<()> {
    disk::release_leftovers(work)?;
    if work.exists() {
        fs::remove_dir_all(work).with_context(|| format!("removing {}", work.display()))?;
    }
    fs::create_dir_all(work)?;
    // The chroot and the disk are made by a child in a mount namespace of its own: its mounts
    // (the host's /dev bound into the chroot among them) never appear in the host's view and
    // go with it however it ends, so nothing here can remove the host's device nodes.
    sh::run(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private"])
            .arg(std::env::current_exe().context("this xtask's path")?)
            .arg("vagrant-box-disk")
            .arg(work),
    )
    .context("making the box's disk")?;
    fs::remove_dir_all(work.join("rootfs"))?;
    let raw = work.join("disk.raw");
    let img = work.join("box.img");
    sh::run(
        Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&raw)
            .arg(&img),
    )?;
    fs::remove_file(&raw)?;
    let boxfile = package(work, &img)?;
    forget_uploaded_box()?;
    sh::run(
        Command::new("vagrant")
            .args(["box", "add", "--force", "--name", NAME])
            .arg(&boxfile),
    )?;
    fs::remove_file(&boxfile)?;
    Ok(())
}

/// The child's part of `build`: the root filesystem and the raw disk.
pub fn rootfs_and_disk(work: &Path) -> anyhow::Result<()> {
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
    write_config(&rootfs)?;
    {
        let _mounts = disk::ChrootMounts::new(&rootfs)?;
        set_up_inside(&rootfs)?;
    }
    forget_machine(&rootfs)?;
    disk::make_disk(&rootfs, &work.join("disk.raw"), &work.join("mnt"))
}

/// A libvirt box: the qcow2 disk, its metadata and an empty Vagrantfile, in a tar.
fn package(work: &Path, img: &Path) -> anyhow::Result<PathBuf> {
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
    fs::remove_file(img)?;
    Ok(boxfile)
}

/// vagrant-libvirt uploads a box into libvirt's pool once, under a name with the box's date; a
/// rebuilt box gets a new volume, and the old one would stay behind. One that a VM's disk is
/// still built on is kept.
fn forget_uploaded_box() -> anyhow::Result<()> {
    let prefix = format!("{}_vagrant_box_image_", NAME.replace('/', "-VAGRANTSLASH-"));
    let out = sh::output(&mut virsh(&["vol-list", "--pool", "default"]))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        // A fresh libvirt has no pool until vagrant-libvirt makes one: nothing was uploaded.
        if err.contains("Storage pool not found") {
            return Ok(());
        }
        bail!("virsh vol-list --pool default: {}", err.trim());
    }
    let volumes: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    for old in volumes.iter().filter(|v| v.starts_with(&prefix)) {
        let users: Vec<&String> = volumes
            .iter()
            .filter(|v| *v != old)
            .filter(|v| {
                sh::output(&mut virsh(&["vol-dumpxml", "--pool", "default", v]))
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(old.as_str()))
            })
            .collect();
        if users.is_empty() {
            sh::run(&mut virsh(&["vol-delete", "--pool", "default", old]))?;
        } else {
            eprintln!("vagrant-box: keeping {old}: the disks {users:?} are built on it");
        }
    }
    Ok(())
}

fn virsh(args: &[&str]) -> Command {
    let mut cmd = Command::new("virsh");
    cmd.args(["-c", "qemu:///system"]).args(args);
    cmd
}

/// Debian's image's apt sources and Vagrant's conventions, as files.
fn write_config(rootfs: &Path) -> anyhow::Result<()> {
    match fs::remove_file(rootfs.join("etc/apt/sources.list")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
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
    // Vagrant logs in with its key; the conventional password stays for the console only.
    fs::write(
        rootfs.join("etc/ssh/sshd_config.d/vagrant.conf"),
        "UseDNS no\nPasswordAuthentication no\n",
    )?;
    fs::write(
        rootfs.join("etc/systemd/system/ssh-hostkeys.service"),
        HOST_KEYS_UNIT,
    )?;
    let sudoers = rootfs.join("etc/sudoers.d/vagrant");
    fs::write(&sudoers, "vagrant ALL=(ALL) NOPASSWD: ALL\n")?;
    fs::set_permissions(&sudoers, fs::Permissions::from_mode(0o440))?;
    Ok(())
}

/// What runs in the chroot: the vagrant user, trust anchors, the upgrade, and GRUB's device
/// for later upgrades in the VM.
fn set_up_inside(rootfs: &Path) -> anyhow::Result<()> {
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
    chroot(rootfs, &["systemctl", "enable", "ssh-hostkeys.service"])?;
    chroot(
        rootfs,
        &[
            "sh",
            "-c",
            "echo 'grub-pc grub-pc/install_devices multiselect /dev/vda' | debconf-set-selections",
        ],
    )?;
    chroot(rootfs, &["update-ca-certificates"])?;
    // Maintainer scripts must not start daemons (sshd among them) on the host from the chroot.
    let policy = rootfs.join("usr/sbin/policy-rc.d");
    fs::write(&policy, "#!/bin/sh\nexit 101\n")?;
    fs::set_permissions(&policy, fs::Permissions::from_mode(0o755))?;
    let upgraded = chroot(rootfs, &["apt-get", "update", "-q"])
        .and_then(|_| chroot(rootfs, &["apt-get", "full-upgrade", "-y", "-q"]))
        .and_then(|_| chroot(rootfs, &["apt-get", "clean"]));
    fs::remove_file(&policy)?;
    upgraded
}

/// Each VM makes its own SSH host keys (ssh-hostkeys.service) and machine id at first boot.
fn forget_machine(rootfs: &Path) -> anyhow::Result<()> {
    for entry in fs::read_dir(rootfs.join("etc/ssh"))?.flatten() {
        if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
            fs::remove_file(entry.path())?;
        }
    }
    fs::write(rootfs.join("etc/machine-id"), "")?;
    match fs::remove_file(rootfs.join("var/lib/dbus/machine-id")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

pub fn chroot(rootfs: &Path, args: &[&str]) -> anyhow::Result<()> {
    sh::run(
        Command::new("chroot")
            .arg(rootfs)
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
