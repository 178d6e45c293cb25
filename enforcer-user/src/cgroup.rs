//! cgroup v2: where it is mounted, and which cgroups belong to which namespace in local mode.
//!
//! Agent-managed namespaces are directories `<cgroup2>/<parent>/<namespace>`. Existing cgroups
//! (systemd services, say) can be mapped to a namespace too; their descendants come along.

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};

use crate::policy::is_dns1123_label;

/// Finds the cgroup2 mount point in `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    find_mount(&info, "cgroup2").context("no cgroup2 filesystem is mounted (cgroup v2 is required)")
}

/// The mount point of the first filesystem of type `fstype` in mountinfo text.
pub fn find_mount(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let point = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next()? == fstype).then(|| PathBuf::from(unescape_mount(point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The id the kernel reports for a cgroup (`bpf_get_current_cgroup_id`) is its inode number.
pub fn cgroup_id(path: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("reading cgroup {}", path.display()))?
        .ino())
}

/// Layout of the cgroups the agent manages.
#[derive(Clone, Debug)]
pub struct Layout {
    pub root: PathBuf,
    /// `<root>/<parent>`: one child directory per namespace.
    pub managed: PathBuf,
    /// Existing cgroups mapped to namespaces (`--cgroup NS=PATH`).
    pub mapped: Vec<(String, PathBuf)>,
}

impl Layout {
    pub fn new(parent: &str, mapped: &[(String, PathBuf)]) -> anyhow::Result<Self> {
        let root = cgroup2_mount()?;
        let mapped = mapped
            .iter()
            .map(|(ns, path)| {
                let path = if path.is_absolute() {
                    path.clone()
                } else {
                    root.join(path)
                };
                (ns.clone(), path)
            })
            .collect();
        Ok(Self {
            managed: root.join(parent.trim_matches('/')),
            root,
            mapped,
        })
    }

    pub fn namespace_dir(&self, namespace: &str) -> anyhow::Result<PathBuf> {
        if !is_dns1123_label(namespace) {
            bail!("{namespace:?} is not a valid namespace name (lowercase letters, digits and '-', at most 63)");
        }
        Ok(self.managed.join(namespace))
    }

    /// Every cgroup that belongs to a namespace now, by id. An error means the caller should keep
    /// its previous view: forgetting a cgroup would stop enforcing it.
    pub fn discover(&self) -> anyhow::Result<BTreeMap<u64, Assignment>> {
        let mut out = BTreeMap::new();
        match std::fs::read_dir(&self.managed) {
            Ok(entries) => {
                for entry in entries.filter_map(Result::ok) {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if entry.path().is_dir() && is_dns1123_label(&name) {
                        walk(&entry.path(), &name, &mut out);
                    }
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(err).with_context(|| format!("listing {}", self.managed.display()))
            }
        }
        for (ns, path) in &self.mapped {
            walk(path, ns, &mut out);
        }
        Ok(out)
    }

    /// Removes the managed namespace directories that hold no process, then the parent.
    pub fn remove_empty(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.managed) {
            for entry in entries.filter_map(Result::ok) {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
        let _ = std::fs::remove_dir(&self.managed);
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub namespace: String,
    pub path: PathBuf,
}

fn walk(dir: &Path, ns: &str, out: &mut BTreeMap<u64, Assignment>) {
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    out.insert(
        meta.ino(),
        Assignment {
            namespace: ns.to_string(),
            path: dir.to_path_buf(),
        },
    );
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(Result::ok) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&entry.path(), ns, out);
            }
        }
    }
}

/// Moves the calling process into the cgroup at `dir`.
pub fn enter(dir: &Path) -> anyhow::Result<()> {
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("moving into cgroup {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let info = "\
25 1 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 31 0:39 / /sys/fs/bpf rw - bpf bpf rw
";
        assert_eq!(
            find_mount(info, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(find_mount(info, "bpf"), Some(PathBuf::from("/sys/fs/bpf")));
        assert_eq!(find_mount(info, "xfs"), None);
        assert_eq!(
            find_mount("1 2 0:1 / /a\\040b rw - cgroup2 x rw", "cgroup2"),
            Some(PathBuf::from("/a b"))
        );
    }
}
