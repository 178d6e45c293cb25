//! The TC programs on enforced pods' veths: attached when a pod has an address, its pins
//! dropped (which detaches a TCX link) when the pod goes or stops being enforced.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use crate::{datapath::Datapath, veth};

/// An enforced pod that has addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNet {
    /// `namespace/name/uid`: a new pod of the same name is another pod.
    pub key: String,
    pub ips: Vec<IpAddr>,
    /// The pod's cgroup, to find one of its processes (and so its network namespace).
    pub cgroup: Option<PathBuf>,
}

#[derive(Default)]
pub struct PodLinks {
    /// Pod key -> host-side interface.
    attached: BTreeMap<String, String>,
    /// Pods whose veth could not be found, with the reason last logged.
    failed: BTreeMap<String, String>,
}

impl PodLinks {
    /// `host_proc` is the host's /proc (needs the host's PID namespace): with it, pods behind a
    /// bridge are found through their network namespace; without it, only routed CNIs.
    pub fn reconcile(
        &mut self,
        dp: &mut Datapath,
        pin_root: &Path,
        pods: &[PodNet],
        host_proc: Option<&Path>,
    ) {
        let gone: Vec<String> = self
            .attached
            .keys()
            .filter(|k| !pods.iter().any(|p| &p.key == *k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(ifname) = self.attached.remove(&key) {
                dp.forget_tc(&ifname, pin_root);
                log::info!("pod {key}: TC programs off {ifname}");
            }
        }
        self.failed.retain(|k, _| pods.iter().any(|p| &p.key == k));
        for pod in pods {
            if self.attached.contains_key(&pod.key) {
                continue;
            }
            let Some(&ip) = pod.ips.first() else {
                continue;
            };
            let netns = host_proc.and_then(|proc| pod_netns(proc, pod.cgroup.as_deref()?));
            let result = veth::host_side(ip, netns.as_deref())
                .and_then(|found| dp.attach_tc(found.ifname(), pin_root).map(|()| found));
            match result {
                Ok(found) => {
                    log::info!("pod {}: TC programs on {}", pod.key, found.ifname());
                    self.attached
                        .insert(pod.key.clone(), found.ifname().to_string());
                    self.failed.remove(&pod.key);
                }
                Err(err) => {
                    let reason = format!("{err:#}");
                    // Connect hooks still enforce it; say so once per reason, not every second.
                    if self.failed.get(&pod.key) != Some(&reason) {
                        log::warn!(
                            "pod {}: no packet-level enforcement yet ({reason}); its sockets are enforced",
                            pod.key
                        );
                        self.failed.insert(pod.key.clone(), reason);
                    }
                }
            }
        }
    }

    /// Pods whose veth was not found yet: tried again on the next refresh.
    pub fn pending(&self) -> usize {
        self.failed.len()
    }
}

/// `<proc>/<pid>/ns/net` of a process in the pod's cgroup tree.
fn pod_netns(proc: &Path, cgroup: &Path) -> Option<PathBuf> {
    let pid = first_pid(cgroup, 0)?;
    Some(proc.join(pid.to_string()).join("ns/net"))
}

fn first_pid(dir: &Path, depth: usize) -> Option<u32> {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    if let Some(pid) = procs
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .find(|&p| p != 0)
    {
        return Some(pid);
    }
    if depth > 2 {
        return None;
    }
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| first_pid(&e.path(), depth + 1))
}
