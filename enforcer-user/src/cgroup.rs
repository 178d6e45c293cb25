//! cgroup v2: where it is mounted, and which cgroups belong to which namespace in local mode.
//!
//! Agent-managed namespaces are directories `<cgroup2>/<parent>/<namespace>`. A workload with
//! labels (`enforcer exec --label app=db`) lives in a child named by its labels,
//! `<namespace>/app=db,tier=data`, so the labels are visible in `/proc/PID/cgroup` and need no
//! other state. Existing cgroups (systemd services, say) can be mapped to a namespace too; their
//! descendants come along.

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

/// The agent's own cgroup under the cgroup2 mount `root`, which the agent exempts before it
/// opens any connection: pinned programs left by an earlier agent would otherwise judge it as
/// an unmapped pod and refuse it the API server.
///
/// `/proc/self/cgroup` names it relative to the agent's cgroup namespace, which in a container
/// is its own cgroup, so the path is only trusted when that cgroup lists this process;
/// otherwise the tree is searched for the cgroup that does (pids read in this pid namespace).
pub fn own_cgroup(root: &Path) -> anyhow::Result<PathBuf> {
    let pid = std::process::id();
    let text = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    if let Some(relative) = text.lines().find_map(|l| l.strip_prefix("0::")) {
        let dir = root.join(relative.trim_start_matches('/'));
        if lists_pid(&dir, pid) {
            return Ok(dir);
        }
    }
    find_pid(root, pid, 0).with_context(|| {
        format!(
            "no cgroup under {} lists this process ({pid})",
            root.display()
        )
    })
}

/// Deep enough for kubelet trees nested in a container runtime (kind); bounded so a huge host
/// tree costs a bounded walk.
const OWN_CGROUP_MAX_DEPTH: usize = 12;

fn find_pid(dir: &Path, pid: u32, depth: usize) -> Option<PathBuf> {
    if lists_pid(dir, pid) {
        return Some(dir.to_path_buf());
    }
    if depth >= OWN_CGROUP_MAX_DEPTH {
        return None;
    }
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| find_pid(&e.path(), pid, depth + 1))
}

fn lists_pid(dir: &Path, pid: u32) -> bool {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .is_ok_and(|procs| procs.lines().any(|l| l.trim().parse() == Ok(pid)))
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
    /// `root` is the cgroup2 mount to use; `None` finds it in mountinfo.
    pub fn new(
        parent: &str,
        mapped: &[(String, PathBuf)],
        root: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let root = match root {
            Some(r) => r.to_path_buf(),
            None => cgroup2_mount()?,
        };
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

    /// The cgroup of workloads in `namespace` with `labels` (the namespace's own when empty).
    pub fn workload_dir(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> anyhow::Result<PathBuf> {
        let dir = self.namespace_dir(namespace)?;
        if labels.is_empty() {
            return Ok(dir);
        }
        let name = encode_labels(labels);
        if name.len() > 255 {
            bail!("the labels make a cgroup name longer than 255 bytes: {name}");
        }
        Ok(dir.join(name))
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
                        walk(&entry.path(), &name, &BTreeMap::new(), true, &mut out);
                    }
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(err).with_context(|| format!("listing {}", self.managed.display()))
            }
        }
        for (ns, path) in &self.mapped {
            walk(path, ns, &BTreeMap::new(), false, &mut out);
        }
        Ok(out)
    }

    /// The cgroups among `found` (from [`Layout::discover`]) that claim their descendants:
    /// namespace cgroups, workload cgroups named by labels, and `--cgroup` mappings. A child a
    /// workload makes and moves into is then enforced from its first instruction, not from
    /// the next scan (the kernel's connect hooks look for the deepest claimed ancestor).
    pub fn tree_roots(&self, found: &BTreeMap<u64, Assignment>) -> BTreeMap<u64, Assignment> {
        found
            .iter()
            .filter(|(_, a)| self.is_tree_root(a))
            .map(|(&id, a)| (id, a.clone()))
            .collect()
    }

    fn is_tree_root(&self, a: &Assignment) -> bool {
        let parent = a.path.parent();
        let namespace_dir = parent == Some(self.managed.as_path());
        // Labels come only from a name in a namespace directory; below it they are inherited.
        let workload_dir =
            !a.labels.is_empty() && parent.and_then(Path::parent) == Some(self.managed.as_path());
        let mapped = self.mapped.iter().any(|(_, path)| *path == a.path);
        namespace_dir || workload_dir || mapped
    }

    /// Removes the managed cgroups that hold no process (workloads, then namespaces), then the
    /// parent.
    pub fn remove_empty(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.managed) {
            for entry in entries.filter_map(Result::ok) {
                if let Ok(children) = std::fs::read_dir(entry.path()) {
                    for child in children.filter_map(Result::ok) {
                        if child.file_type().is_ok_and(|t| t.is_dir()) {
                            let _ = std::fs::remove_dir(child.path());
                        }
                    }
                }
                let _ = std::fs::remove_dir(entry.path());
            }
        }
        let _ = std::fs::remove_dir(&self.managed);
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub namespace: String,
    /// The workload's labels, which select Sidecars.
    pub labels: BTreeMap<String, String>,
    pub path: PathBuf,
    /// The pod it is, in Kubernetes mode: records name it.
    pub pod: Option<String>,
}

/// `dir` and its descendants belong to `ns`. In a managed namespace directory, children named
/// by labels are workloads; everything below them inherits their labels.
fn walk(
    dir: &Path,
    ns: &str,
    labels: &BTreeMap<String, String>,
    managed_ns_dir: bool,
    out: &mut BTreeMap<u64, Assignment>,
) {
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    out.insert(
        meta.ino(),
        Assignment {
            namespace: ns.to_string(),
            labels: labels.clone(),
            path: dir.to_path_buf(),
            pod: None,
        },
    );
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(Result::ok) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let child_labels = managed_ns_dir
                    .then(|| decode_labels(&entry.file_name().to_string_lossy()))
                    .flatten();
                walk(
                    &entry.path(),
                    ns,
                    child_labels.as_ref().unwrap_or(labels),
                    false,
                    out,
                );
            }
        }
    }
}

/// `app=db,tier=data`; `%`, `,` and `/` (label key prefixes) are percent-encoded.
pub fn encode_labels(labels: &BTreeMap<String, String>) -> String {
    let esc = |s: &str| {
        s.replace('%', "%25")
            .replace(',', "%2C")
            .replace('/', "%2F")
    };
    labels
        .iter()
        .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// The labels a workload cgroup's name encodes; `None` for a name that is not a label list.
pub fn decode_labels(name: &str) -> Option<BTreeMap<String, String>> {
    let unesc = |s: &str| {
        s.replace("%2F", "/")
            .replace("%2C", ",")
            .replace("%25", "%")
    };
    name.split(',')
        .map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (!k.is_empty()).then(|| (unesc(k), unesc(v)))
        })
        .collect()
}

/// Parses `k=v,k2=v2` (as given to `--label` or `--workload`).
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for pair in text.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not key=value"))?;
        if !crate::policy::is_label_key(k) {
            return Err(format!("{k:?} is not a valid label key"));
        }
        if !crate::policy::is_label_value(v) {
            return Err(format!("{v:?} is not a valid label value"));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
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
    fn labels_round_trip_through_cgroup_names() {
        let labels = parse_labels("app=db,example.com/tier=data%1").unwrap_err();
        assert!(labels.contains("label value"), "{labels}");
        let labels = parse_labels("app=db,example.com/tier=data").unwrap();
        let name = encode_labels(&labels);
        assert_eq!(name, "app=db,example.com%2Ftier=data");
        assert!(!name.contains('/'));
        assert_eq!(decode_labels(&name), Some(labels));
        assert_eq!(decode_labels("worker"), None, "not a label list");
        assert_eq!(decode_labels("=x"), None);
        assert!(parse_labels("app").is_err());
    }

    #[test]
    fn namespaces_labelled_workloads_and_mappings_claim_their_subtrees() {
        let layout = Layout::new(
            "enforcer",
            &[(
                "batch".to_string(),
                PathBuf::from("system.slice/batch.service"),
            )],
            Some(Path::new("/cg")),
        )
        .expect("layout");
        let labels = parse_labels("app=db").expect("labels");
        let found: BTreeMap<u64, Assignment> = [
            ("/cg/enforcer/default", "default", BTreeMap::new()),
            (
                "/cg/enforcer/default/made-by-workload",
                "default",
                BTreeMap::new(),
            ),
            ("/cg/enforcer/shop/app=db", "shop", labels.clone()),
            ("/cg/enforcer/shop/app=db/child", "shop", labels),
            ("/cg/system.slice/batch.service", "batch", BTreeMap::new()),
            (
                "/cg/system.slice/batch.service/worker",
                "batch",
                BTreeMap::new(),
            ),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (path, ns, labels))| {
            let a = Assignment {
                namespace: ns.to_string(),
                labels,
                path: PathBuf::from(path),
                pod: None,
            };
            (i as u64, a)
        })
        .collect();
        let roots: Vec<u64> = layout.tree_roots(&found).into_keys().collect();
        assert_eq!(roots, vec![0, 2, 4], "{found:#?}");
    }

    #[test]
    fn own_cgroup_is_the_one_that_lists_this_process() {
        let Ok(root) = cgroup2_mount() else {
            eprintln!("skipped: no cgroup2 mount on this machine");
            return;
        };
        let own = own_cgroup(&root).expect("own cgroup");
        assert!(lists_pid(&own, std::process::id()), "{}", own.display());
        assert!(own.starts_with(&root));
        assert!(!lists_pid(Path::new("/nonexistent"), 1));
    }

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
