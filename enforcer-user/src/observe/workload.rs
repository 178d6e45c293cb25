//! Who a record is about: the workload (a Kubernetes pod, a local pod, a labelled cgroup)
//! behind the cgroup a socket hook saw, or behind the veth a TC program saw.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
    os::unix::fs::DirEntryExt as _,
    path::PathBuf,
    sync::Mutex,
};

use crate::{cgroup::Assignment, datapath::plan::PodAssignment};

/// A record's workload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Who {
    pub namespace: String,
    pub pod: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// The socket's own cgroup, where one was seen.
    pub cgroup: Option<PathBuf>,
}

/// Directories one search below the subtrees visits at most: a record never waits on a
/// large cgroup tree, it only goes without its pod's name.
const SEARCH_BUDGET: usize = 4096;
/// Cgroups remembered; past this the memory is cleared and rebuilt by the next searches.
const REMEMBERED: usize = 4096;

/// What the last apply mapped, to name records' workloads.
#[derive(Debug, Default)]
pub struct Workloads {
    /// Every cgroup the plan maps by id, each with its workload.
    cgroups: BTreeMap<u64, Assignment>,
    /// Those whose descendants belong to them (pods' cgroups, whose containers are children).
    trees: BTreeSet<u64>,
    pods: BTreeMap<IpAddr, PodAssignment>,
    /// Pod veths by interface index, each with the pod's addresses.
    veths: BTreeMap<u32, Vec<IpAddr>>,
    /// Descendants of trees found by searching: the cgroup's path and its tree's id (`None`
    /// for a cgroup not found, which stays unfound: ids are never reused).
    found: Mutex<BTreeMap<u64, Option<(PathBuf, u64)>>>,
}

impl Workloads {
    pub fn new(
        cgroups: &BTreeMap<u64, Assignment>,
        trees: &BTreeMap<u64, Assignment>,
        pods: &[PodAssignment],
    ) -> Self {
        let mut all = cgroups.clone();
        for (id, a) in trees {
            all.entry(*id).or_insert_with(|| a.clone());
        }
        Self {
            cgroups: all,
            trees: trees.keys().copied().collect(),
            pods: pods.iter().map(|p| (p.ip, p.clone())).collect(),
            veths: BTreeMap::new(),
            found: Mutex::default(),
        }
    }

    pub fn set_veths(&mut self, veths: BTreeMap<u32, Vec<IpAddr>>) {
        self.veths = veths;
    }

    /// The workloads as units: each tree (a pod, a namespace or workload cgroup, a mapping),
    /// by namespace and labels.
    pub fn roots(&self) -> impl Iterator<Item = (&str, &BTreeMap<String, String>)> {
        // The kubelet's roots are where pods' cgroups are, not workloads.
        self.trees
            .iter()
            .filter_map(|t| self.cgroups.get(t))
            .filter(|a| a.namespace != crate::k8s::UNMAPPED)
            .map(|a| (a.namespace.as_str(), &a.labels))
    }

    /// The labels of pod `namespace/name` of this node.
    pub fn labels_of(&self, namespace: &str, name: &str) -> Option<BTreeMap<String, String>> {
        let named =
            |ns: &str, pod: &Option<String>| ns == namespace && pod.as_deref() == Some(name);
        self.cgroups
            .values()
            .find(|a| named(&a.namespace, &a.pod))
            .map(|a| a.labels.clone())
            .or_else(|| {
                let pod = self.pods.values().find(|p| named(&p.namespace, &p.pod))?;
                Some(pod.labels.clone())
            })
    }

    /// The workload of the socket's cgroup: the cgroup itself, or the tree it is under.
    pub fn of_cgroup(&self, id: u64) -> Option<Who> {
        if let Some(a) = self.cgroups.get(&id) {
            return Some(who(a, a.path.clone()));
        }
        let (path, root) = self.search(id)?;
        self.cgroups.get(&root).map(|a| who(a, path))
    }

    /// The pod behind a veth, by the addresses registered for it.
    pub fn of_veth(&self, ifindex: u32) -> Option<Who> {
        let pod = self
            .veths
            .get(&ifindex)?
            .iter()
            .find_map(|ip| self.pods.get(ip))?;
        Some(Who {
            namespace: pod.namespace.clone(),
            pod: pod.pod.clone(),
            labels: pod.labels.clone(),
            cgroup: None,
        })
    }

    fn search(&self, id: u64) -> Option<(PathBuf, u64)> {
        let mut found = self.found.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = found.get(&id) {
            return known.clone();
        }
        if found.len() >= REMEMBERED {
            found.clear();
        }
        match self.walk(id) {
            Walk::Found(path, root) => {
                found.insert(id, Some((path.clone(), root)));
                Some((path, root))
            }
            Walk::Absent => {
                found.insert(id, None);
                None
            }
            // Not remembered: a later search, after pods went, may find it.
            Walk::OverBudget => None,
        }
    }

    /// Breadth first below the trees, the deepest (most specific) trees first. Directory
    /// entries give their type and inode (a cgroup's id) without a stat, and only
    /// directories (cgroups) count against the budget, not their interface files.
    fn walk(&self, id: u64) -> Walk {
        let mut roots: Vec<(u64, &PathBuf)> = self
            .trees
            .iter()
            .filter_map(|t| Some((*t, &self.cgroups.get(t)?.path)))
            .collect();
        roots.sort_by_key(|(_, p)| std::cmp::Reverse(p.components().count()));
        let mut budget = SEARCH_BUDGET;
        for (root, path) in roots {
            let mut queue = VecDeque::from([path.clone()]);
            while let Some(dir) = queue.pop_front() {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries.filter_map(Result::ok) {
                    if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                        continue;
                    }
                    if entry.ino() == id {
                        return Walk::Found(entry.path(), root);
                    }
                    if budget == 0 {
                        return Walk::OverBudget;
                    }
                    budget -= 1;
                    queue.push_back(entry.path());
                }
            }
        }
        Walk::Absent
    }

    /// Keeps what `old` found below trees that are still trees, so that a new apply does not
    /// search again for every container.
    pub fn keep_found(&mut self, old: &Self) {
        let old = old.found.lock().unwrap_or_else(|p| p.into_inner());
        let kept = old
            .iter()
            .filter_map(|(id, f)| Some((*id, f.clone()?)))
            .filter(|(_, (_, root))| self.trees.contains(root))
            .map(|(id, f)| (id, Some(f)));
        self.found
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(kept);
    }
}

enum Walk {
    Found(PathBuf, u64),
    Absent,
    OverBudget,
}

fn who(a: &Assignment, cgroup: PathBuf) -> Who {
    Who {
        namespace: a.namespace.clone(),
        pod: a.pod.clone(),
        labels: a.labels.clone(),
        cgroup: Some(cgroup),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    fn assignment(path: &std::path::Path, pod: &str) -> Assignment {
        Assignment {
            namespace: "shop".into(),
            labels: BTreeMap::from([("app".into(), "web".into())]),
            path: path.to_path_buf(),
            pod: Some(pod.into()),
        }
    }

    #[test]
    fn a_container_cgroup_is_named_by_the_pod_tree_it_is_under() {
        let dir = std::env::temp_dir().join(format!("enforcer-who-{}", std::process::id()));
        let pod = dir.join("kubepods/pod-a");
        let container = pod.join("cri-containerd-1");
        std::fs::create_dir_all(&container).unwrap();
        let ino = |p: &std::path::Path| std::fs::metadata(p).unwrap().ino();
        let trees = BTreeMap::from([(ino(&pod), assignment(&pod, "web-1"))]);
        let workloads = Workloads::new(&BTreeMap::new(), &trees, &[]);

        let who = workloads.of_cgroup(ino(&container)).unwrap();
        assert_eq!(who.pod.as_deref(), Some("web-1"));
        assert_eq!(who.cgroup.as_deref(), Some(container.as_path()));
        assert_eq!(who.labels["app"], "web");
        // Found once, then remembered; an unknown id is not found.
        assert_eq!(workloads.of_cgroup(ino(&container)), Some(who));
        let unknown = workloads.of_cgroup(ino(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(unknown, None);
    }

    #[test]
    fn interface_files_do_not_use_up_the_search() {
        let dir = std::env::temp_dir().join(format!("enforcer-who-files-{}", std::process::id()));
        let ino = |p: &std::path::Path| std::fs::metadata(p).unwrap().ino();
        // Many pods, each with as many files as a cgroup has, the wanted one last.
        let mut trees = BTreeMap::new();
        for i in 0..60 {
            let pod = dir.join(format!("pod-{i:02}"));
            std::fs::create_dir_all(pod.join("ctr")).unwrap();
            for f in 0..80 {
                std::fs::write(pod.join(format!("cgroup.file{f}")), "").unwrap();
            }
            trees.insert(ino(&pod), assignment(&pod, &format!("web-{i}")));
        }
        let last = dir.join("pod-59/ctr");
        let workloads = Workloads::new(&BTreeMap::new(), &trees, &[]);
        let who = workloads.of_cgroup(ino(&last));
        // Kept for the next apply, while its pod is.
        let mut next = Workloads::new(&BTreeMap::new(), &trees, &[]);
        next.keep_found(&workloads);
        let remembered = next.found.lock().unwrap().len();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(who.and_then(|w| w.pod).as_deref(), Some("web-59"));
        assert_eq!(remembered, 1);
    }

    #[test]
    fn a_veth_is_named_by_its_pod_address() {
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let pods = [PodAssignment {
            ip,
            namespace: "shop".into(),
            labels: BTreeMap::new(),
            pod: Some("web-2".into()),
        }];
        let mut workloads = Workloads::new(&BTreeMap::new(), &BTreeMap::new(), &pods);
        workloads.set_veths(BTreeMap::from([(12, vec![ip])]));
        assert_eq!(workloads.of_veth(12).unwrap().pod.as_deref(), Some("web-2"));
        assert_eq!(workloads.of_veth(13), None);
    }
}
