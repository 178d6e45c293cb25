//! Which scope each pod on this node gets: pure, from the Pod and Namespace objects and the pod
//! cgroups found under the kubelet's hierarchy.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
};

use k8s_openapi::api::core::v1::Pod;

use super::pod_links::PodNet;
use crate::{cgroup::Assignment, datapath::plan::PodAssignment, kubelet::PodCgroup};

/// Scope of pods this agent does not enforce: their namespace is not selected, they use the
/// node's network, or they are finished. Not a valid namespace name, so no namespace shares it.
pub const UNENFORCED: &str = "enforcer.unenforced";
/// Scope of the kubelet's root cgroups: pods whose cgroup exists before the agent has mapped it.
pub const UNMAPPED: &str = "enforcer.unmapped";

/// The kubelet names a static pod's cgroup after the pod's config hash, which its mirror pod
/// carries in this annotation (the mirror's own uid differs).
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// A pod on this node, as far as enforcement cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePod {
    /// The uid in the pod's cgroup name.
    pub cgroup_uid: String,
    /// metadata.uid.
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub host_network: bool,
    pub ips: Vec<IpAddr>,
}

impl NodePod {
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let uid = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(MIRROR_ANNOTATION))
            .or(meta.uid.as_ref())?
            .clone();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        if let Some(ip) = status
            .and_then(|s| s.pod_ip.as_ref())
            .and_then(|ip| ip.parse().ok())
        {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        Some(Self {
            cgroup_uid: uid,
            uid: meta.uid.clone().unwrap_or_default(),
            namespace: meta.namespace.clone()?,
            name: meta.name.clone().unwrap_or_default(),
            labels: meta
                .labels
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            host_network: pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false),
            ips,
        })
    }
}

/// What the planner needs from Kubernetes: pod cgroups (with their containers) and pod
/// addresses (for the TC program), each with the workload it belongs to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Mapping {
    pub trees: BTreeMap<PathBuf, Assignment>,
    pub addresses: Vec<PodAssignment>,
    /// Enforced pods with addresses, for the TC programs on their veths.
    pub pod_nets: Vec<PodNet>,
}

/// Maps every pod found in the cgroup tree that the API server knows. `kubelet_roots` map to
/// [`UNMAPPED`]; pods only the API server knows (no cgroup yet) are skipped, and so are cgroups
/// of pods it does not know (they stay [`UNMAPPED`]).
pub fn map(
    pods: &[NodePod],
    enforced_namespaces: &BTreeSet<String>,
    found: &BTreeMap<String, PodCgroup>,
    kubelet_roots: &[PathBuf],
    enforce_host_network: bool,
) -> Mapping {
    let mut out = Mapping::default();
    for root in kubelet_roots {
        out.trees
            .insert(root.clone(), assignment(UNMAPPED, BTreeMap::new(), root));
    }
    for pod in pods {
        let enforced = enforced_namespaces.contains(&pod.namespace)
            && (enforce_host_network || !pod.host_network);
        let (namespace, labels) = if enforced {
            (pod.namespace.as_str(), pod.labels.clone())
        } else {
            (UNENFORCED, BTreeMap::new())
        };
        if let Some(cg) = found.get(&pod.cgroup_uid) {
            out.trees.insert(
                cg.path.clone(),
                assignment(namespace, labels.clone(), &cg.path),
            );
        }
        // A host-network pod's address is the node's: never judge it per packet.
        if enforced && !pod.host_network {
            out.addresses
                .extend(pod.ips.iter().map(|&ip| PodAssignment {
                    ip,
                    namespace: namespace.to_string(),
                    labels: labels.clone(),
                }));
            if !pod.ips.is_empty() {
                out.pod_nets.push(PodNet {
                    key: format!("{}/{}/{}", pod.namespace, pod.name, pod.uid),
                    ips: pod.ips.clone(),
                    cgroup: found.get(&pod.cgroup_uid).map(|cg| cg.path.clone()),
                });
            }
        }
    }
    out
}

fn assignment(
    namespace: &str,
    labels: BTreeMap<String, String>,
    path: &std::path::Path,
) -> Assignment {
    Assignment {
        namespace: namespace.to_string(),
        labels,
        path: path.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubelet::{Driver, Qos};

    const UID_A: &str = "11111111-2222-3333-4444-555555555555";
    const UID_B: &str = "aaaaaaaa-2222-3333-4444-555555555555";
    const UID_C: &str = "cccccccc-2222-3333-4444-555555555555";
    /// A static pod's uid in its cgroup name: the kubelet's config hash, not a dashed uid.
    const HASH: &str = "6e8e5c2b4f0a4b6e9a2f1c3d4e5f6a7b";

    fn pod(yaml: &str) -> NodePod {
        let pod: Pod = serde_yaml::from_str(yaml).expect("pod");
        NodePod::from_pod(&pod).expect("a pod")
    }

    fn cg(uid: &str) -> (String, PodCgroup) {
        (
            uid.to_string(),
            PodCgroup {
                uid: uid.to_string(),
                qos: Qos::BestEffort,
                driver: Driver::Systemd,
                path: PathBuf::from(format!("/cg/kubepods.slice/{uid}")),
            },
        )
    }

    #[test]
    fn pods_get_their_namespace_or_are_left_unenforced() {
        let pods = [
            pod(&format!("metadata: {{name: web, namespace: shop, uid: {UID_A}, labels: {{app: web}}}}\nstatus: {{podIP: 10.1.0.5, podIPs: [{{ip: 10.1.0.5}}, {{ip: 'fd00::5'}}]}}")),
            pod(&format!("metadata: {{name: tool, namespace: other, uid: {UID_B}}}\nstatus: {{podIP: 10.1.0.6}}")),
            pod(&format!("metadata: {{name: agent, namespace: shop, uid: {UID_C}}}\nspec: {{hostNetwork: true, containers: []}}\nstatus: {{podIP: 192.0.2.2}}")),
            pod(&format!("metadata: {{name: etcd, namespace: shop, uid: {UID_A}x, annotations: {{kubernetes.io/config.mirror: {HASH}}}}}")),
        ];
        let enforced = BTreeSet::from(["shop".to_string()]);
        let found = BTreeMap::from([cg(UID_A), cg(UID_B), cg(UID_C), cg(HASH)]);
        let roots = [PathBuf::from("/cg/kubepods.slice")];
        let m = map(&pods, &enforced, &found, &roots, false);

        let scope = |uid: &str| {
            let a = &m.trees[&PathBuf::from(format!("/cg/kubepods.slice/{uid}"))];
            (a.namespace.clone(), a.labels.get("app").cloned())
        };
        assert_eq!(scope(UID_A), ("shop".into(), Some("web".into())));
        assert_eq!(
            scope(UID_B),
            (UNENFORCED.into(), None),
            "namespace not selected"
        );
        assert_eq!(scope(UID_C), (UNENFORCED.into(), None), "hostNetwork");
        assert_eq!(scope(HASH).0, "shop", "a static pod by its config hash");
        assert_eq!(m.trees[&roots[0]].namespace, UNMAPPED);
        let ips: Vec<String> = m.addresses.iter().map(|p| p.ip.to_string()).collect();
        assert_eq!(
            ips,
            ["10.1.0.5", "fd00::5"],
            "only enforced pods with their own network"
        );
        assert_eq!(m.pod_nets.len(), 1, "the mirror pod has no address");
        assert_eq!(m.pod_nets[0].key, format!("shop/web/{UID_A}"));

        let m = map(&pods, &enforced, &found, &roots, true);
        assert_eq!(
            m.trees[&PathBuf::from(format!("/cg/kubepods.slice/{UID_C}"))].namespace,
            "shop"
        );
        assert!(
            m.addresses.iter().all(|p| p.ip.to_string() != "192.0.2.2"),
            "a host-network pod's address is the node's"
        );
    }

    #[test]
    fn cgroups_without_pods_and_pods_without_cgroups() {
        let pods = [pod(&format!(
            "metadata: {{name: new, namespace: shop, uid: {UID_A}}}"
        ))];
        let found = BTreeMap::from([cg(UID_B)]);
        let m = map(&pods, &BTreeSet::from(["shop".into()]), &found, &[], false);
        assert!(
            m.trees.is_empty(),
            "the unknown cgroup stays under the root's UNMAPPED scope"
        );
        assert!(m.addresses.is_empty(), "no address yet");
    }
}
