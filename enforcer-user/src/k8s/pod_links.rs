//! The TC programs on enforced pods' veths: attached when a pod has an address, its pins
//! dropped (which detaches a TCX link) when the pod goes or stops being enforced.

use std::{
    collections::BTreeMap,
    fs::File,
    net::IpAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use crate::{
    datapath::{self, Datapath},
    veth,
};

/// An enforced pod that has addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNet {
    /// `namespace/name/uid`: a new pod of the same name is another pod.
    pub key: String,
    pub ips: Vec<IpAddr>,
    /// The pod's cgroup, to find one of its processes (and so its network namespace).
    pub cgroup: Option<PathBuf>,
}

/// Where a pod's TC programs are.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Link {
    ifname: String,
    /// The interface the links went on: a later interface may get its name.
    ifindex: u32,
}

impl Link {
    /// Whether the interface is gone, or its name is another interface's now (the pod's veth
    /// was made anew, say). Unknown counts as no: detaching live links would be worse.
    fn replaced(&self) -> bool {
        matches!(veth::ifindex(&self.ifname), Ok(now) if now != Some(self.ifindex))
    }
}

#[derive(Default)]
pub struct PodLinks {
    /// Pod key -> host-side interface.
    attached: BTreeMap<String, Link>,
    /// Pods whose veth could not be found, with the reason last logged.
    failed: BTreeMap<String, String>,
    /// Whether the pins earlier agents left were looked at (at the first reconcile).
    swept: bool,
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
        if !self.swept {
            Self::sweep_stale(pin_root);
            self.swept = true;
        }
        self.detach_gone(dp, pin_root, pods);
        self.failed.retain(|k, _| pods.iter().any(|p| &p.key == k));
        for pod in pods {
            if !self.attached.contains_key(&pod.key) {
                self.attach(dp, pin_root, pod, host_proc);
            }
        }
    }

    /// Removes the pins of TC links whose veth went while no agent ran (their pods were
    /// deleted meanwhile): nothing else would, as no agent knows them.
    pub fn sweep_stale(pin_root: &Path) {
        let removed = datapath::sweep_stale_tc(pin_root);
        if removed > 0 {
            log::info!("removed {removed} pins of TC links whose interface is gone");
        }
    }

    /// Takes the links off pods that went, and forgets those of pods whose interface went or
    /// was replaced (a new sandbox): those are looked up again.
    fn detach_gone(&mut self, dp: &mut Datapath, pin_root: &Path, pods: &[PodNet]) {
        let gone: Vec<String> = self
            .attached
            .iter()
            .filter(|(k, link)| !pods.iter().any(|p| &p.key == *k) || link.replaced())
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            if let Some(link) = self.attached.remove(&key) {
                dp.forget_tc_of(&link.ifname, link.ifindex, pin_root);
                log::info!("pod {key}: TC programs off {}", link.ifname);
            }
        }
    }

    fn attach(
        &mut self,
        dp: &mut Datapath,
        pin_root: &Path,
        pod: &PodNet,
        host_proc: Option<&Path>,
    ) {
        let Some(&ip) = pod.ips.first() else {
            return;
        };
        // Held open until the veth is found: the namespace stays the pod's, whatever its PID.
        let netns = host_proc.and_then(|proc| pod_netns(proc, pod.cgroup.as_deref()?));
        let result = veth::host_side(ip, netns.as_ref().map(|n| n.path.as_path()))
            .and_then(|found| match holder(&self.attached, found.ifname()) {
                Some(other) => Err(shared(found.ifname(), other)),
                None => Ok(found),
            })
            .and_then(|found| {
                let ifindex = dp.attach_tc_indexed(found.ifname(), &pod.ips, pin_root)?;
                Ok((found, ifindex))
            });
        match result {
            Ok((found, ifindex)) => {
                log::info!("pod {}: TC programs on {}", pod.key, found.ifname());
                let ifname = found.ifname().to_string();
                self.attached
                    .insert(pod.key.clone(), Link { ifname, ifindex });
                self.failed.remove(&pod.key);
            }
            Err(err) => self.fail(&pod.key, format!("{err:#}")),
        }
    }

    fn fail(&mut self, key: &str, reason: String) {
        // Connect hooks still enforce it; say so once per reason, not every second.
        if self.failed.get(key) != Some(&reason) {
            log::warn!(
                "pod {key}: no packet-level enforcement yet ({reason}); its sockets are enforced"
            );
            self.failed.insert(key.to_string(), reason);
        }
    }

    /// Pods whose veth was not found yet: tried again on the next refresh.
    pub fn pending(&self) -> usize {
        self.failed.len()
    }

    /// Why the pod `key` has no TC programs, if it is one of [`PodLinks::pending`].
    pub fn failure(&self, key: &str) -> Option<&str> {
        self.failed.get(key).map(String::as_str)
    }
}

/// The pod whose TC programs are on `ifname` already. A pod's veth is its own: an interface
/// that two pods' addresses lead to is a shared device, where TC would judge both as one and
/// the first one's going would take the other's programs off.
fn holder<'a>(attached: &'a BTreeMap<String, Link>, ifname: &str) -> Option<&'a str> {
    attached
        .iter()
        .find(|(_, link)| link.ifname == ifname)
        .map(|(key, _)| key.as_str())
}

fn shared(ifname: &str, holder: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{ifname} carries pod {holder}'s TC programs already; a pod's veth is its own, so \
         {ifname} is shared (a CNI's host device?) and not this pod's"
    )
}

/// A pod's network namespace, held open.
struct PodNetns {
    _file: File,
    /// Names the open namespace for `nsenter`, in the agent's own /proc.
    path: PathBuf,
}

/// The network namespace of a process in the pod's cgroup tree, from `<proc>/<pid>/ns/net`.
fn pod_netns(proc: &Path, cgroup: &Path) -> Option<PodNetns> {
    let pid = first_pid(cgroup, 0)?;
    let file = File::open(proc.join(pid.to_string()).join("ns/net")).ok()?;
    // The PID was read before the open: if its process ended meanwhile, the PID may be another
    // process's by now, and the namespace opened that one's. Checked after the open, the
    // process whose namespace is held was in the pod.
    let record = std::fs::read_to_string(proc.join(pid.to_string()).join("cgroup")).ok()?;
    if !in_cgroup(&record, cgroup) {
        log::debug!(
            "process {pid} left {} before its namespace was read",
            cgroup.display()
        );
        return None;
    }
    let path = PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        file.as_raw_fd()
    ));
    Some(PodNetns { _file: file, path })
}

/// Whether `record` (a `/proc/<pid>/cgroup`) names `pod_cgroup` or a cgroup below it. The
/// record's path is relative to the reader's cgroup namespace (in a container its own cgroup,
/// hence leading `..`s), `pod_cgroup` a path under the host's cgroup2 mount: the record's path
/// past its `..`s must begin with a tail of `pod_cgroup`. A pod's own cgroup is named after its
/// UID, so no other pod's path has that tail.
fn in_cgroup(record: &str, pod_cgroup: &Path) -> bool {
    let Some(path) = record.lines().find_map(|l| l.strip_prefix("0::")) else {
        return false;
    };
    let down: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != "..")
        .collect();
    let pod: Vec<&str> = pod_cgroup.iter().filter_map(|c| c.to_str()).collect();
    (1..=down.len()).any(|n| pod.ends_with(&down[..n]))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory under the temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("enforcer-pod-links-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("scratch directory");
            Self(dir)
        }

        fn write(&self, relative: &str, text: &str) -> PathBuf {
            let path = self.0.join(relative);
            let parent = path.parent().expect("a parent");
            std::fs::create_dir_all(parent).expect("directories");
            std::fs::write(&path, text).expect("writing");
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The pod's cgroup listed PID 4242, but by the time its namespace is opened that PID is
    /// another process, in another pod's cgroup: its namespace is not the pod's.
    #[test]
    fn a_reused_pid_does_not_lend_its_namespace() {
        let s = Scratch::new("reuse");
        let pod = "kubepods/besteffort/pod1111";
        s.write(&format!("cgroup/{pod}/ctr/cgroup.procs"), "4242\n");
        let cgroup = s.0.join("cgroup").join(pod);
        s.write("proc/4242/ns/net", "");
        let proc = s.0.join("proc");

        s.write("proc/4242/cgroup", "0::/kubepods/besteffort/pod2222/ctr\n");
        assert!(pod_netns(&proc, &cgroup).is_none(), "another pod's process");
        s.write("proc/4242/cgroup", "0::/kubepods/besteffort/pod11112/ctr\n");
        assert!(pod_netns(&proc, &cgroup).is_none(), "a longer name");

        s.write("proc/4242/cgroup", "0::/kubepods/besteffort/pod1111/ctr\n");
        assert!(pod_netns(&proc, &cgroup).is_some(), "the pod's process");
        // In a private cgroup namespace the path is relative to the agent's own cgroup.
        s.write("proc/4242/cgroup", "0::/../../besteffort/pod1111/ctr\n");
        assert!(
            pod_netns(&proc, &cgroup).is_some(),
            "seen from a cgroup namespace"
        );
        s.write("proc/4242/cgroup", "0::/../../burstable/pod1111/ctr\n");
        assert!(pod_netns(&proc, &cgroup).is_none(), "another parent");
    }
}
