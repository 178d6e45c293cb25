//! One user of the test address ranges at a time, across processes: kernel tests of several
//! checkouts, and the benchmark, all make test hosts on the same documentation ranges.

use std::{fs, os::fd::AsRawFd as _};

use anyhow::{ensure, Context as _};

/// Waits for the machine-wide lock; it is held until the returned file closes.
pub fn machine_lock() -> anyhow::Result<fs::File> {
    let path = std::env::temp_dir().join("enforcer-kernel-tests.lock");
    let file = fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    ensure!(
        rc == 0,
        "locking {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    Ok(file)
}
