//! Which scope each pod on this node gets: pure, from the Pod and Namespace objects and the pod
//! cgroups found under the kubelet's hierarchy.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
};

use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::ObjectMeta};

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
/// Where the kubelet got a pod: `api` for pods from the API server, `file` or `http` for static
/// pods.
const SOURCE_ANNOTATION: &str = "kubernetes.io/config.source";

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
    /// An Istio sidecar (injected: `sidecar.istio.io/status`) or ambient's ztunnel
    /// (`istio.io/dataplane-mode: ambient`) captures the pod's DNS: the agent must not redirect it.
    pub dns_captured: bool,
}

impl NodePod {
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let uid = cgroup_uid(meta)?.clone();
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
            dns_captured: dns_captured(meta),
        })
    }

    /// Whether the pod claims its cgroup by the mirror annotation rather than its own uid.
    fn is_mirror(&self) -> bool {
        self.cgroup_uid != self.uid
    }
}

/// Whether Istio captures the pod's DNS itself (sidecar injection, or ambient mode).
fn dns_captured(meta: &ObjectMeta) -> bool {
    let injected = meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("sidecar.istio.io/status"));
    let ambient = meta
        .labels
        .as_ref()
        .and_then(|l| l.get("istio.io/dataplane-mode"))
        .is_some_and(|m| m == "ambient");
    injected || ambient
}

/// The uid in the name of a pod's cgroup. Anyone who may create pods can set the mirror
/// annotation, so it is believed only on what looks like a mirror pod: owned by a Node and
/// from a config source other than the API server. Even then [`map`] never lets it take a
/// cgroup that a pod's own uid names, because the owner and source can be forged as well.
fn cgroup_uid(meta: &ObjectMeta) -> Option<&String> {
    let annotation = |key| meta.annotations.as_ref().and_then(|a| a.get(key));
    let static_source = annotation(SOURCE_ANNOTATION).is_some_and(|s| s != "api");
    let node_owned = meta
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "Node");
    match annotation(MIRROR_ANNOTATION) {
        Some(hash) if static_source && node_owned => Some(hash),
        _ => meta.uid.as_ref(),
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
    /// Cgroups more than one pod claims, each with the pod whose scope it got, for the caller
    /// to report.
    pub conflicts: Vec<String>,
    /// Cgroups of pods whose DNS Istio captures (see [`NodePod::dns_captured`]).
    pub dns_skip: BTreeSet<PathBuf>,
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
        out.trees.insert(
            root.clone(),
            assignment(UNMAPPED, BTreeMap::new(), root, None),
        );
    }
    let is_enforced = |pod: &NodePod| {
        enforced_namespaces.contains(&pod.namespace) && (enforce_host_network || !pod.host_network)
    };
    let owners = owners(pods, found, is_enforced, &mut out.conflicts);
    for (uid, &i) in &owners {
        let (Some(pod), Some(cg)) = (pods.get(i), found.get(*uid)) else {
            continue;
        };
        let (namespace, labels) = scope_of(pod, is_enforced(pod));
        out.trees.insert(
            cg.path.clone(),
            assignment(namespace, labels, &cg.path, Some(pod)),
        );
        if pod.dns_captured {
            out.dns_skip.insert(cg.path.clone());
        }
    }
    for (i, pod) in pods.iter().enumerate() {
        // A host-network pod's address is the node's: never judge it per packet.
        if !is_enforced(pod) || pod.host_network {
            continue;
        }
        let (namespace, labels) = scope_of(pod, true);
        out.addresses
            .extend(pod.ips.iter().map(|&ip| PodAssignment {
                ip,
                namespace: namespace.to_string(),
                labels: labels.clone(),
                pod: Some(pod.name.clone()),
            }));
        if !pod.ips.is_empty() {
            // Only the cgroup the pod won: another pod's would lead to another pod's veth.
            let owns = owners.get(pod.cgroup_uid.as_str()) == Some(&i);
            out.pod_nets.push(PodNet {
                key: format!("{}/{}/{}", pod.namespace, pod.name, pod.uid),
                ips: pod.ips.clone(),
                cgroup: found
                    .get(&pod.cgroup_uid)
                    .filter(|_| owns)
                    .map(|cg| cg.path.clone()),
            });
        }
    }
    out
}

/// The scope an enforced pod gets (its namespace and labels); [`UNENFORCED`] otherwise.
fn scope_of(pod: &NodePod, enforced: bool) -> (&str, BTreeMap<String, String>) {
    if enforced {
        (pod.namespace.as_str(), pod.labels.clone())
    } else {
        (UNENFORCED, BTreeMap::new())
    }
}

/// The pod (index into `pods`) each found cgroup belongs to. A pod's own uid outranks a mirror
/// claim (the annotation is only the pod author's word). Among equal claims the stricter scope
/// wins, failing closed: an enforced namespace over [`UNENFORCED`], then the first by
/// namespace/name, so the result does not depend on the order of `pods`. Every cgroup claimed
/// more than once is described in `conflicts`.
fn owners<'a>(
    pods: &'a [NodePod],
    found: &BTreeMap<String, PodCgroup>,
    is_enforced: impl Fn(&NodePod) -> bool,
    conflicts: &mut Vec<String>,
) -> BTreeMap<&'a str, usize> {
    let mut claims: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, pod) in pods.iter().enumerate() {
        if found.contains_key(&pod.cgroup_uid) {
            claims.entry(&pod.cgroup_uid).or_default().push(i);
        }
    }
    let mut owners = BTreeMap::new();
    for (uid, mut claimants) in claims {
        claimants.sort_by_key(|&i| {
            let pod = &pods[i];
            (
                pod.is_mirror(),
                !is_enforced(pod),
                pod.namespace.as_str(),
                pod.name.as_str(),
            )
        });
        let [winner, rest @ ..] = claimants.as_slice() else {
            continue;
        };
        if !rest.is_empty() {
            conflicts.push(conflict(uid, pods, &claimants));
        }
        owners.insert(uid, *winner);
    }
    owners
}

/// One line for a cgroup with several claimants, `claimants` sorted with the winner first.
fn conflict(uid: &str, pods: &[NodePod], claimants: &[usize]) -> String {
    let names: Vec<String> = claimants
        .iter()
        .filter_map(|&i| pods.get(i))
        .map(|p| {
            let how = if p.is_mirror() {
                "mirror annotation"
            } else {
                "its uid"
            };
            format!("{}/{} ({how})", p.namespace, p.name)
        })
        .collect();
    let winner = claimants
        .first()
        .and_then(|&i| pods.get(i))
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .unwrap_or_default();
    format!(
        "the cgroup of pod uid {uid} is claimed by {}; {winner}'s scope is used",
        names.join(", ")
    )
}

fn assignment(
    namespace: &str,
    labels: BTreeMap<String, String>,
    path: &std::path::Path,
    pod: Option<&NodePod>,
) -> Assignment {
    Assignment {
        namespace: namespace.to_string(),
        labels,
        path: path.to_path_buf(),
        pod: pod.map(|p| p.name.clone()),
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

    /// A mirror pod's uid: the API server's, unlike its static pod's config hash.
    const UID_M: &str = "eeeeeeee-2222-3333-4444-555555555555";

    /// A mirror pod as the kubelet creates it: owned by the Node, its source a file.
    fn mirror(ns: &str, name: &str, uid: &str, hash: &str) -> String {
        format!(
            r#"metadata:
  name: {name}
  namespace: {ns}
  uid: {uid}
  annotations:
    kubernetes.io/config.hash: {hash}
    kubernetes.io/config.mirror: {hash}
    kubernetes.io/config.source: file
  ownerReferences:
  - {{apiVersion: v1, kind: Node, name: node-a, uid: 0f0f0f0f-2222-3333-4444-555555555555, controller: true}}
"#
        )
    }

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
    fn pods_whose_dns_istio_captures_are_skipped_by_the_dns_proxy() {
        let pods = [
            pod(&format!("metadata: {{name: meshed, namespace: shop, uid: {UID_A}, annotations: {{sidecar.istio.io/status: '{{}}'}}}}")),
            pod(&format!("metadata: {{name: ambient, namespace: shop, uid: {UID_B}, labels: {{istio.io/dataplane-mode: ambient}}}}")),
            pod(&format!("metadata: {{name: plain, namespace: shop, uid: {UID_C}, labels: {{istio.io/dataplane-mode: none}}}}")),
        ];
        let enforced = BTreeSet::from(["shop".to_string()]);
        let found = BTreeMap::from([cg(UID_A), cg(UID_B), cg(UID_C)]);
        let m = map(&pods, &enforced, &found, &[], false);
        let skipped: Vec<String> = m.dns_skip.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            skipped,
            [
                format!("/cg/kubepods.slice/{UID_A}"),
                format!("/cg/kubepods.slice/{UID_B}")
            ]
        );
    }

    #[test]
    fn pods_get_their_namespace_or_are_left_unenforced() {
        let pods = [
            pod(&format!("metadata: {{name: web, namespace: shop, uid: {UID_A}, labels: {{app: web}}}}\nstatus: {{podIP: 10.1.0.5, podIPs: [{{ip: 10.1.0.5}}, {{ip: 'fd00::5'}}]}}")),
            pod(&format!("metadata: {{name: tool, namespace: other, uid: {UID_B}}}\nstatus: {{podIP: 10.1.0.6}}")),
            pod(&format!("metadata: {{name: agent, namespace: shop, uid: {UID_C}}}\nspec: {{hostNetwork: true, containers: []}}\nstatus: {{podIP: 192.0.2.2}}")),
            pod(&mirror("shop", "etcd", UID_M, HASH)),
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

    #[test]
    fn the_mirror_annotation_is_believed_only_on_a_mirror_pod() {
        let real = pod(&mirror("kube-system", "etcd-node-a", UID_M, HASH));
        assert_eq!(real.cgroup_uid, HASH);
        let bare = pod(&format!(
            "metadata: {{name: evil, namespace: sandbox, uid: {UID_B}, annotations: {{kubernetes.io/config.mirror: {HASH}}}}}"
        ));
        assert_eq!(bare.cgroup_uid, UID_B, "no Node owner, no config source");
        let from_api =
            mirror("sandbox", "evil", UID_B, HASH).replace("source: file", "source: api");
        assert_eq!(pod(&from_api).cgroup_uid, UID_B, "config source api");
        let owned_by_rs =
            mirror("sandbox", "evil", UID_B, HASH).replace("kind: Node", "kind: ReplicaSet");
        assert_eq!(pod(&owned_by_rs).cgroup_uid, UID_B, "not owned by a Node");
    }

    #[test]
    fn a_mirror_claim_never_takes_a_cgroup_a_pod_uid_names() {
        let web = pod(&format!(
            "metadata: {{name: web, namespace: shop, uid: {UID_A}, labels: {{app: web}}}}"
        ));
        let enforced = BTreeSet::from(["shop".to_string()]);
        let found = BTreeMap::from([cg(UID_A), cg(UID_B)]);
        let path = PathBuf::from(format!("/cg/kubepods.slice/{UID_A}"));
        // Unenforced (an unlock) and enforced (its own REGISTRY_ONLY or Sidecar) attackers; the
        // annotation alone, and with a forged Node owner and config source.
        let bare = format!(
            "metadata: {{name: evil, namespace: sandbox, uid: {UID_B}, labels: {{app: evil}}, annotations: {{kubernetes.io/config.mirror: {UID_A}}}}}"
        );
        let forged = mirror("sandbox", "evil", UID_B, UID_A);
        for attacker in [bare, forged] {
            let attacker = format!("{attacker}\nstatus: {{podIP: 10.1.0.9}}\n");
            for sandbox_enforced in [false, true] {
                let mut enforced = enforced.clone();
                if sandbox_enforced {
                    enforced.insert("sandbox".to_string());
                }
                for pods in [[web.clone(), pod(&attacker)], [pod(&attacker), web.clone()]] {
                    let m = map(&pods, &enforced, &found, &[], false);
                    let got = &m.trees[&path];
                    assert_eq!(
                        (
                            got.namespace.as_str(),
                            got.labels.get("app").map(String::as_str)
                        ),
                        ("shop", Some("web")),
                        "{pods:?}"
                    );
                    assert!(
                        m.pod_nets.iter().all(|p| p.cgroup.as_ref() != Some(&path)),
                        "the loser's veth is not looked for through shop/web's cgroup"
                    );
                }
            }
        }
    }

    #[test]
    fn two_mirror_claims_fail_closed_to_the_stricter_scope() {
        let found = BTreeMap::from([cg(HASH)]);
        let path = PathBuf::from(format!("/cg/kubepods.slice/{HASH}"));
        let etcd = pod(&mirror("kube-system", "etcd-node-a", UID_M, HASH));
        let other = pod(&mirror("sandbox", "evil", UID_B, HASH));
        let shop = pod(&mirror("shop", "evil", UID_C, HASH));
        let cases = [
            // An enforced namespace beats UNENFORCED.
            (
                BTreeSet::from(["sandbox".to_string()]),
                [&etcd, &other],
                "sandbox",
            ),
            // Between enforced namespaces, the first by namespace/name.
            (
                BTreeSet::from(["sandbox".to_string(), "shop".to_string()]),
                [&shop, &other],
                "sandbox",
            ),
        ];
        for (enforced, [a, b], want) in cases {
            for pods in [[a.clone(), b.clone()], [b.clone(), a.clone()]] {
                let m = map(&pods, &enforced, &found, &[], false);
                assert_eq!(m.trees[&path].namespace, want, "{pods:?}");
                assert_eq!(m.conflicts.len(), 1, "{:?}", m.conflicts);
                assert!(m.conflicts[0].contains(HASH), "{}", m.conflicts[0]);
            }
        }
    }
}
