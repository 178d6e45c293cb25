//! This node's side of Kubernetes mode: the pods' cgroups under the kubelet's hierarchy, watched
//! with inotify so that a new pod is mapped as soon as its cgroup appears.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use super::{
    pod_links::{PodLinks, PodNet},
    workloads, Cluster,
};
use crate::{
    cgroup::{self, Assignment},
    datapath::{plan::PodAssignment, Datapath},
    istio::OutboundMode,
    kubelet,
    policy::Desired,
};

/// What a connect from a pod cgroup that is not mapped yet gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Unmapped {
    /// The strictest mode of any enforced scope (an unmapped pod may belong to any of them);
    /// the mesh's mode when no namespace is enforced.
    Mesh,
    Refuse,
    Allow,
    /// Allowed and reported.
    Audit,
}

impl Unmapped {
    /// `strictest`: see [`strictest_mode`].
    pub fn mode(self, strictest: OutboundMode) -> OutboundMode {
        match self {
            Self::Mesh => strictest,
            Self::Refuse => OutboundMode::RegistryOnly,
            Self::Allow => OutboundMode::AllowAny,
            Self::Audit => OutboundMode::Audit,
        }
    }
}

/// The strictest mode of the scopes of `enforced` namespaces, or `mesh` when none is enforced.
/// An ALLOW_ANY mesh with one REGISTRY_ONLY Sidecar must not let a pod of that Sidecar run
/// unenforced while it is unmapped, or while the agent is down.
pub fn strictest_mode(
    desired: &Desired,
    enforced: &BTreeSet<String>,
    mesh: OutboundMode,
) -> OutboundMode {
    let rank = |m: &OutboundMode| match m {
        OutboundMode::AllowAny => 0,
        OutboundMode::Audit => 1,
        OutboundMode::RegistryOnly => 2,
    };
    desired
        .scopes
        .values()
        .filter(|s| enforced.contains(&s.namespace))
        .map(|s| s.mode)
        .max_by_key(rank)
        .unwrap_or(mesh)
}

#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub cluster: super::Options,
    /// Where the kubelet's root cgroups are searched (absolute).
    pub kubelet_cgroups: PathBuf,
    pub unmapped: Unmapped,
    pub enforce_host_network: bool,
    /// The host's /proc, to enter pods' network namespaces (bridge CNIs); needs hostPID.
    pub host_proc: Option<PathBuf>,
}

/// The pods on this node and where they run, as last computed.
pub struct Node {
    opts: NodeOptions,
    pub cluster: Cluster,
    /// Cgroup id -> workload, for the whole pod subtree.
    pub trees: BTreeMap<u64, Assignment>,
    pub addresses: Vec<PodAssignment>,
    pod_nets: Vec<PodNet>,
    links: PodLinks,
    watched_roots: Vec<PathBuf>,
    watcher: Option<notify::RecommendedWatcher>,
    cgroup_tx: mpsc::UnboundedSender<()>,
    /// Pods that claim one cgroup (forged mirror pods), as last reported.
    conflicts: Vec<String>,
    /// Cgroup ids of pods whose DNS Istio captures: never redirected to the agent's proxy.
    pub dns_skip: BTreeSet<u64>,
    /// Pod cgroups (by uid) that no pod the API server named owns yet, and since when: the
    /// window in which a pod runs under the unmapped scope.
    unmapped_since: BTreeMap<String, Instant>,
    /// Pod cgroups mapped, so that each pod's window is observed once.
    mapped: BTreeSet<String>,
    /// Windows that closed (the pod was mapped) since [`Node::take_unmapped_windows`].
    closed_windows: Vec<Duration>,
}

impl Node {
    /// `cgroup_tx` gets `()` whenever a cgroup appears or goes under a kubelet root.
    pub fn new(opts: NodeOptions, cluster: Cluster, cgroup_tx: mpsc::UnboundedSender<()>) -> Self {
        Self {
            opts,
            cluster,
            trees: BTreeMap::new(),
            addresses: Vec::new(),
            pod_nets: Vec::new(),
            links: PodLinks::default(),
            watched_roots: Vec::new(),
            watcher: None,
            cgroup_tx,
            conflicts: Vec::new(),
            dns_skip: BTreeSet::new(),
            unmapped_since: BTreeMap::new(),
            mapped: BTreeSet::new(),
            closed_windows: Vec::new(),
        }
    }

    pub fn namespaces(&self) -> BTreeSet<String> {
        self.cluster.enforced_namespaces()
    }

    /// Enforced pods whose veth was not found yet (no TC programs).
    pub fn tc_pending(&self) -> usize {
        self.links.pending()
    }

    /// Namespaces in AUDIT by their label.
    pub fn audit_namespaces(&self) -> BTreeSet<String> {
        self.cluster.audit_namespaces()
    }

    /// The namespaces of the workloads on this node: the only scopes it compiles.
    pub fn local_namespaces(&self) -> BTreeSet<String> {
        self.trees
            .values()
            .map(|a| &a.namespace)
            .chain(self.addresses.iter().map(|p| &p.namespace))
            .cloned()
            .collect()
    }

    /// The unmapped scope's mode for this compiled policy.
    pub fn unmapped_mode(&self, desired: &Desired, mesh: OutboundMode) -> OutboundMode {
        let strictest = strictest_mode(desired, &self.namespaces(), mesh);
        self.opts.unmapped.mode(strictest)
    }

    /// Recomputes the mapping from the stores and the cgroup tree; returns whether it changed.
    pub fn refresh(&mut self) -> bool {
        let roots = kubelet::roots(&self.opts.kubelet_cgroups);
        if roots != self.watched_roots {
            self.watch(&roots);
        }
        let found = kubelet::discover(&self.opts.kubelet_cgroups);
        let mapping = workloads::map(
            &self.cluster.node_pods(),
            &self.namespaces(),
            &found,
            &roots,
            self.opts.enforce_host_network,
        );
        self.track_unmapped(&found, &mapping.trees);
        let mut trees = BTreeMap::new();
        for (path, assignment) in mapping.trees {
            match cgroup::cgroup_id(&path) {
                Ok(id) => {
                    trees.insert(id, assignment);
                }
                // Removed since the walk: the pod is gone.
                Err(err) => log::debug!("{err:#}"),
            }
        }
        if mapping.conflicts != self.conflicts {
            for conflict in &mapping.conflicts {
                log::warn!("{conflict}");
            }
            self.conflicts = mapping.conflicts;
        }
        let dns_skip: BTreeSet<u64> = mapping
            .dns_skip
            .iter()
            .filter_map(|p| cgroup::cgroup_id(p).ok())
            .collect();
        let changed =
            trees != self.trees || mapping.addresses != self.addresses || dns_skip != self.dns_skip;
        self.dns_skip = dns_skip;
        self.trees = trees;
        self.addresses = mapping.addresses;
        self.pod_nets = mapping.pod_nets;
        changed
    }

    /// Notes which pod cgroups are still unmapped, and closes the windows of those mapped now.
    fn track_unmapped(
        &mut self,
        found: &BTreeMap<String, kubelet::PodCgroup>,
        trees: &BTreeMap<PathBuf, Assignment>,
    ) {
        let now = Instant::now();
        let mut still = BTreeMap::new();
        let mut mapped = BTreeSet::new();
        for (uid, cg) in found {
            let since = self.unmapped_since.get(uid).copied();
            if !trees.contains_key(&cg.path) {
                still.insert(uid.clone(), since.unwrap_or(now));
                continue;
            }
            // Mapped when first seen: a window shorter than one look (observed as 0).
            if !self.mapped.contains(uid) {
                self.closed_windows
                    .push(since.map_or(Duration::ZERO, |since| now - since));
            }
            mapped.insert(uid.clone());
        }
        self.unmapped_since = still;
        self.mapped = mapped;
    }

    /// Pods that run unmapped now, and how long the oldest has.
    pub fn unmapped_pods(&self) -> (usize, Duration) {
        let oldest = self
            .unmapped_since
            .values()
            .min()
            .map_or(Duration::ZERO, Instant::elapsed);
        (self.unmapped_since.len(), oldest)
    }

    /// How long each pod mapped since the last call had run unmapped.
    pub fn take_unmapped_windows(&mut self) -> Vec<Duration> {
        std::mem::take(&mut self.closed_windows)
    }

    /// Puts the TC programs on enforced pods' veths (after their addresses are in the maps).
    pub fn attach_pods(&mut self, dp: &mut Datapath, pin_root: &std::path::Path) {
        self.links
            .reconcile(dp, pin_root, &self.pod_nets, self.opts.host_proc.as_deref());
    }

    /// Whether a pod's veth is still to be found (worth a retry).
    pub fn links_pending(&self) -> bool {
        self.links.pending() > 0
    }

    fn watch(&mut self, roots: &[PathBuf]) {
        use notify::Watcher as _;
        let tx = self.cgroup_tx.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok_and(|ev| ev.kind.is_create() || ev.kind.is_remove() || ev.need_rescan()) {
                let _ = tx.send(());
            }
        });
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(err) => {
                log::warn!("cannot watch the kubelet's cgroups ({err}); rescanning every second");
                return;
            }
        };
        for root in roots {
            if let Err(err) = watcher.watch(root, notify::RecursiveMode::Recursive) {
                log::warn!(
                    "watching {}: {err}; rescanning every second",
                    root.display()
                );
            } else {
                log::info!("watching pod cgroups under {}", root.display());
            }
        }
        self.watcher = Some(watcher);
        self.watched_roots = roots.to_vec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ScopePolicy;

    fn scope(namespace: &str, mode: OutboundMode) -> ScopePolicy {
        ScopePolicy {
            namespace: namespace.into(),
            mode,
            ..ScopePolicy::default()
        }
    }

    #[test]
    fn unmapped_pods_get_the_strictest_enforced_mode_not_the_mesh_one() {
        let mut desired = Desired::default();
        desired
            .scopes
            .insert("shop".into(), scope("shop", OutboundMode::AllowAny));
        desired.scopes.insert(
            "shop/batch".into(),
            scope("shop", OutboundMode::RegistryOnly),
        );
        desired
            .scopes
            .insert("other".into(), scope("other", OutboundMode::Audit));
        let shop = BTreeSet::from(["shop".to_string()]);
        let allow = OutboundMode::AllowAny;
        assert_eq!(
            Unmapped::Mesh.mode(strictest_mode(&desired, &shop, allow)),
            OutboundMode::RegistryOnly,
            "a REGISTRY_ONLY Sidecar in an ALLOW_ANY mesh"
        );
        let other = BTreeSet::from(["other".to_string()]);
        assert_eq!(strictest_mode(&desired, &other, allow), OutboundMode::Audit);
        assert_eq!(
            strictest_mode(&desired, &BTreeSet::new(), OutboundMode::RegistryOnly),
            OutboundMode::RegistryOnly,
            "nothing enforced: the mesh's mode"
        );
        assert_eq!(
            Unmapped::Allow.mode(OutboundMode::RegistryOnly),
            OutboundMode::AllowAny
        );
    }
}
