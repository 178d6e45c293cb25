//! Pods' cgroups on a Kubernetes node, as the kubelet lays them out under cgroup v2, for
//! Kubernetes mode. Both cgroup drivers:
//!
//! - systemd: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice/<container>`,
//!   with the uid's dashes written as underscores, and Guaranteed pods one level up
//!   (`kubepods.slice/kubepods-pod<uid>.slice`);
//! - cgroupfs: `kubepods/<qos>/pod<uid>/<container>`, Guaranteed pods at `kubepods/pod<uid>`.
//!
//! A static pod's `<uid>` is its config hash (32 hex digits), not the uid of its mirror pod.
//!
//! Container cgroups are named by the runtime: `cri-containerd-<id>.scope` (containerd),
//! `crio-<id>.scope` and `crio-conmon-<id>.scope` (CRI-O), `docker-<id>.scope`, or the bare id
//! under cgroupfs. Every container cgroup of a pod belongs to the pod, so mapping the pod's
//! cgroup with its descendants covers them all, pause and conmon included.

#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

/// The kubelet's cgroup driver, as seen from a cgroup's path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

/// A pod's quality-of-service class, which places its cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// A pod found in the cgroup tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    /// The uid in the cgroup's name: a pod's metadata.uid with dashes, or a static pod's config
    /// hash.
    pub uid: String,
    pub qos: Qos,
    pub driver: Driver,
    /// Absolute path of the pod's cgroup.
    pub path: PathBuf,
}

/// The pod a cgroup belongs to, from its path relative to the cgroup2 root: the pod's cgroup
/// itself or any cgroup below it. `None` for everything else (the QoS levels, node services).
pub fn pod_of(relative: &Path) -> Option<(String, Qos, Driver, PathBuf)> {
    let parts: Vec<&str> = relative.iter().filter_map(|p| p.to_str()).collect();
    // The kubelet's root may be nested (kind nodes, --cgroup-root): under systemd its slices
    // then carry the parents' names (`kubelet-kubepods.slice`, `kubelet-kubepods-burstable.slice`).
    let top = parts.iter().position(|p| {
        *p == "kubepods" || *p == "kubepods.slice" || p.ends_with("-kubepods.slice")
    })?;
    let driver = if parts[top] == "kubepods" {
        Driver::Cgroupfs
    } else {
        Driver::Systemd
    };
    let rest = &parts[top + 1..];
    let (qos, pod_part, depth) = match (driver, rest) {
        (Driver::Systemd, [first, tail @ ..]) => {
            let base = parts[top].strip_suffix(".slice")?;
            if let Some(uid) = systemd_pod(first, &format!("{base}-pod")) {
                (Qos::Guaranteed, uid, 1)
            } else {
                let class = first.strip_prefix(base)?.strip_suffix(".slice")?;
                let qos = match class {
                    "-burstable" => Qos::Burstable,
                    "-besteffort" => Qos::BestEffort,
                    _ => return None,
                };
                let prefix = format!("{base}{class}-pod");
                (qos, systemd_pod(tail.first()?, &prefix)?, 2)
            }
        }
        (Driver::Cgroupfs, [first, tail @ ..]) => {
            if let Some(uid) = first.strip_prefix("pod") {
                (Qos::Guaranteed, uid.to_string(), 1)
            } else {
                let qos = match *first {
                    "burstable" => Qos::Burstable,
                    "besteffort" => Qos::BestEffort,
                    _ => return None,
                };
                (qos, tail.first()?.strip_prefix("pod")?.to_string(), 2)
            }
        }
        _ => return None,
    };
    if !is_uid(&pod_part) {
        return None;
    }
    let path: PathBuf = parts[..=top + depth].iter().collect();
    Some((pod_part, qos, driver, path))
}

/// `kubepods-burstable-pod1234_abcd.slice` -> `1234-abcd`.
fn systemd_pod(name: &str, prefix: &str) -> Option<String> {
    let uid = name.strip_prefix(prefix)?.strip_suffix(".slice")?;
    Some(uid.replace('_', "-"))
}

/// A pod uid as the kubelet names cgroups: a Kubernetes object uid, or a static pod's.
fn is_uid(s: &str) -> bool {
    is_object_uid(s) || is_config_hash(s)
}

/// A Kubernetes object uid: 36 characters of hex digits and dashes (RFC 4122 text form).
fn is_object_uid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// A static pod's uid: the kubelet sets it to the pod's config hash (`%x` of an MD5, so 32
/// lowercase hex digits, no dashes), and its mirror pod in the API server carries it in the
/// `kubernetes.io/config.mirror` annotation.
fn is_config_hash(s: &str) -> bool {
    s.len() == 32 && s.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'))
}

/// Every pod cgroup under `root` (the cgroup2 mount), by pod uid.
pub fn discover(root: &Path) -> BTreeMap<String, PodCgroup> {
    let mut found = BTreeMap::new();
    walk(root, root, 0, &mut found);
    found
}

/// Pod cgroups sit a few levels below the cgroup root (more with a nested kubelet root);
/// containers are not walked.
fn walk(root: &Path, dir: &Path, depth: usize, found: &mut BTreeMap<String, PodCgroup>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        let Ok(relative) = path.strip_prefix(root) else {
            continue;
        };
        match pod_of(relative) {
            Some((uid, qos, driver, pod_path)) if pod_path == relative => {
                found.insert(
                    uid.clone(),
                    PodCgroup {
                        uid,
                        qos,
                        driver,
                        path,
                    },
                );
            }
            _ if depth < 5 => walk(root, &path, depth + 1, found),
            _ => {}
        }
    }
}

/// The kubelet's root cgroups under `dir` (`kubepods`, `kubepods.slice`, or a nested
/// `<parent>-kubepods.slice`), a few levels deep at most.
pub fn roots(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    find_roots(dir, 0, &mut found);
    found.sort();
    found
}

fn find_roots(dir: &Path, depth: usize, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == "kubepods" || name == "kubepods.slice" || name.ends_with("-kubepods.slice") {
            found.push(entry.path());
        } else if depth < 3 {
            find_roots(&entry.path(), depth + 1, found);
        }
    }
}
