//! bpffs: found from mountinfo, mounted at `/sys/fs/bpf` when no one has mounted it yet.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};

const DEFAULT_MOUNT: &str = "/sys/fs/bpf";

/// Where bpffs is mounted, if it is.
pub fn mount_point() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    crate::cgroup::find_mount(&info, "bpf")
}

/// The default pin root: `<bpffs>/enforcer`.
pub fn default_pin_root() -> PathBuf {
    mount_point()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MOUNT))
        .join("enforcer")
}

/// Makes sure `pin_root` lies on a bpffs, mounting one at `/sys/fs/bpf` if none is mounted.
pub fn ensure_mounted(pin_root: &Path) -> anyhow::Result<()> {
    if let Some(mount) = mount_point() {
        if pin_root.starts_with(&mount) {
            return Ok(());
        }
        bail!(
            "{} is not on the bpffs mounted at {}",
            pin_root.display(),
            mount.display()
        );
    }
    if !pin_root.starts_with(DEFAULT_MOUNT) {
        bail!(
            "no bpffs is mounted, and {} is not under {DEFAULT_MOUNT}",
            pin_root.display()
        );
    }
    std::fs::create_dir_all(DEFAULT_MOUNT).with_context(|| format!("creating {DEFAULT_MOUNT}"))?;
    let target = CString::new(DEFAULT_MOUNT)?;
    let fstype = CString::new("bpf")?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("mounting bpffs at /sys/fs/bpf");
    }
    log::info!("mounted bpffs at {DEFAULT_MOUNT}");
    Ok(())
}
