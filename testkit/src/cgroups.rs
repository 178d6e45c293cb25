//! Cgroups for tests and benchmarks: running a process in one from its first instruction, and
//! removing a tree of them (with whatever still runs there).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::Context as _;

/// The cgroup2 mount point, from mountinfo.
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(point))
        })
        .context("no cgroup2 mount")
}

/// `program` run inside `cgroup`: a shell moves itself there, then becomes the program, so
/// nothing of it runs outside. Add the program's arguments to the returned command.
pub fn in_cgroup(cgroup: &Path, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
        .arg(cgroup)
        .arg(program);
    sh
}

/// Kills what runs in `dir` and below, then removes the cgroups bottom up (bounded retries:
/// a killed process leaves its cgroup a moment later).
pub fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.filter_map(Result::ok) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    for _ in 0..50 {
        let _ = fs::write(dir.join("cgroup.kill"), "1");
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
