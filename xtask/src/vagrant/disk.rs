//! The box's raw disk: one bootable ext4 partition labelled `root`, GRUB in its MBR. Mounts
//! and loop devices are released by guards; `make_box::build` runs all of this in a child in a
//! mount namespace of its own.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _};

use super::make_box::{chroot, DISK_GIB};
use crate::sh;

pub fn make_disk(rootfs: &Path, raw: &Path, mnt: &Path) -> anyhow::Result<()> {
    sh::run(
        Command::new("truncate")
            .args(["-s", &format!("{DISK_GIB}G")])
            .arg(raw),
    )?;
    partition(raw)?;
    let loop_dev = LoopDevice::attach(raw)?;
    let part = format!("{}p1", loop_dev.path);
    sh::run(Command::new("mkfs.ext4").args(["-q", "-L", "root", &part]))?;
    let root = Mount::new(&part, mnt, &[])?;
    sh::run(Command::new("cp").arg("-a").arg(rootfs.join(".")).arg(mnt))?;
    {
        let _mounts = ChrootMounts::new(mnt)?;
        chroot(mnt, &["grub-install", "--target=i386-pc", &loop_dev.path])?;
        chroot(mnt, &["update-grub"])?;
    }
    // Without udev, grub-mkconfig names the loop device: the VM's disk has the label instead.
    let cfg_path = mnt.join("boot/grub/grub.cfg");
    let cfg = fs::read_to_string(&cfg_path)?.replace(&format!("root={part}"), "root=LABEL=root");
    if cfg.contains("/dev/loop") {
        bail!("{} still names a loop device", cfg_path.display());
    }
    fs::write(&cfg_path, cfg)?;
    // Written through before the image is read.
    root.unmount()
}

fn partition(raw: &Path) -> anyhow::Result<()> {
    eprintln!("+ sfdisk {}", raw.display());
    let mut child = Command::new("sfdisk")
        .arg(raw)
        .stdin(Stdio::piped())
        .spawn()
        .context("sfdisk")?;
    child
        .stdin
        .take()
        .context("sfdisk's input")?
        .write_all(b"label: dos\ntype=83, bootable\n")?;
    if !child.wait()?.success() {
        bail!("sfdisk {} failed", raw.display());
    }
    Ok(())
}

/// What a killed run of older code could leave: loop devices over the disk image (they keep
/// the deleted image alive) and mounts under `work`, in the host's view. Fails if a mount
/// stays, so that `work` is never removed through one.
pub fn release_leftovers(work: &Path) -> anyhow::Result<()> {
    if !work.exists() {
        return Ok(());
    }
    let raw = work.join("disk.raw");
    if raw.exists() {
        let out = sh::output(Command::new("losetup").arg("-j").arg(&raw))?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(dev) = line.split(':').next() {
                let _ = Command::new("losetup").args(["-d", dev]).status();
            }
        }
    }
    let dir = fs::canonicalize(work)?;
    for point in mounts_under(&dir)? {
        let _ = Command::new("umount").arg("-l").arg(&point).status();
    }
    let left = mounts_under(&dir)?;
    if !left.is_empty() {
        bail!("still mounted under {}: {left:?}", dir.display());
    }
    Ok(())
}

/// Mount points under `dir` in this process's view, deepest first.
fn mounts_under(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    Ok(points)
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
        let dev = LoopDevice {
            path: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        };
        // losetup -P does not always make the partition here; partx does (and fails, harmlessly,
        // when it exists).
        let part = format!("{}p1", dev.path);
        if !Path::new(&part).exists() {
            let _ = sh::output(Command::new("partx").args(["-a", &dev.path]));
        }
        if !Path::new(&part).exists() {
            bail!("{part} did not appear");
        }
        Ok(dev)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.path]).status();
    }
}

/// A mount, undone when dropped (lazily), or by `unmount`, which reports failure.
struct Mount {
    target: PathBuf,
    mounted: bool,
}

impl Mount {
    fn new(source: &str, target: &Path, options: &[&str]) -> anyhow::Result<Self> {
        fs::create_dir_all(target)?;
        sh::run(Command::new("mount").args(options).arg(source).arg(target))?;
        Ok(Mount {
            target: target.to_path_buf(),
            mounted: true,
        })
    }

    fn unmount(mut self) -> anyhow::Result<()> {
        self.mounted = false;
        sh::run(Command::new("umount").arg(&self.target))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.target).status();
        }
    }
}

/// /dev, /proc and /sys inside a chroot, for apt's maintainer scripts and grub-install.
pub struct ChrootMounts {
    _mounts: Vec<Mount>,
}

impl ChrootMounts {
    pub fn new(root: &Path) -> anyhow::Result<Self> {
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

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(
            super::unescape_mountinfo(r"/work/my\040tree/a\134b"),
            r"/work/my tree/a\b"
        );
        assert_eq!(super::unescape_mountinfo(r"/plain\04"), r"/plain\04");
    }
}
