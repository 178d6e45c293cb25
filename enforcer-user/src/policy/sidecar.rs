//! Which Sidecar applies to a workload, and what it imports, following Istio's
//! `pilot/pkg/model/sidecar.go`: a Sidecar selecting the workload (oldest first), else the
//! namespace's Sidecar without a selector, else the root namespace's, else the mesh defaults.
//! A Sidecar's unset `outboundTrafficPolicy` means the mesh's, not another Sidecar's.

use std::{collections::BTreeMap, sync::Arc};

use crate::istio::{OutboundMode, Sidecar};

/// One egress listener: on `port` (or every port), the `namespace -> hosts` it imports.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Listener {
    port: Option<u16>,
    hosts: BTreeMap<String, Vec<String>>,
}

/// What a Sidecar's `egress` imports, for the namespace it takes effect in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Imports {
    listeners: Vec<Listener>,
}

impl Imports {
    fn new(sidecar: &Sidecar, config_ns: &str) -> Self {
        let listeners = if sidecar.spec.egress.is_empty() {
            vec![Listener {
                port: None,
                hosts: BTreeMap::from([("*".to_string(), vec!["*".to_string()])]),
            }]
        } else {
            sidecar
                .spec
                .egress
                .iter()
                .map(|e| {
                    let mut hosts: BTreeMap<String, Vec<String>> = BTreeMap::new();
                    for pattern in &e.hosts {
                        if let Some((ns, host)) = pattern.split_once('/') {
                            let ns = if ns == "." { config_ns } else { ns };
                            hosts
                                .entry(ns.to_string())
                                .or_default()
                                .push(host.to_string());
                        }
                    }
                    // An HTTP_PROXY listener is a generic proxy: Istio does not match its port.
                    let port = e.port.as_ref().and_then(|p| {
                        let proxy = p
                            .protocol
                            .as_deref()
                            .is_some_and(|x| x.eq_ignore_ascii_case("HTTP_PROXY"));
                        (!proxy && p.number != 0)
                            .then(|| u16::try_from(p.number).ok())
                            .flatten()
                    });
                    Listener { port, hosts }
                })
                .collect()
        };
        Self { listeners }
    }

    /// Whether `host` of a ServiceEntry in `se_ns` is imported on service port `port`. As in
    /// Istio, an import naming the entry's namespace hides the `*/` imports of that listener.
    pub fn imports(&self, se_ns: &str, host: &str, port: u16) -> bool {
        self.listeners.iter().any(|l| {
            l.port.is_none_or(|p| p == port)
                && l.hosts
                    .get(se_ns)
                    .or_else(|| l.hosts.get("*"))
                    .is_some_and(|patterns| patterns.iter().any(|p| host_matches(p, host)))
        })
    }

    /// Imports of a gateway's workloads: each routed host, on the routed port if the route
    /// names one.
    pub fn routed(destinations: Vec<(String, Option<u16>)>) -> Self {
        let listeners = destinations
            .into_iter()
            .map(|(host, port)| Listener {
                port,
                hosts: BTreeMap::from([("*".to_string(), vec![host])]),
            })
            .collect();
        Self { listeners }
    }

    /// The listener ports that narrow imports, for messages.
    pub fn ports(&self) -> Vec<u16> {
        self.listeners.iter().filter_map(|l| l.port).collect()
    }
}

/// The Sidecar in force for one scope: a namespace, or the workloads a Sidecar selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarScope {
    /// `namespace/name` of the Sidecar in force; `None` for the mesh defaults.
    pub sidecar: Option<String>,
    /// For the workloads of egress gateways: the Gateways (see `policy::gateway`).
    pub gateway: Option<String>,
    /// `Some` for a Sidecar that selects workloads by these labels.
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: OutboundMode,
    /// `None` imports everything visible to the namespace.
    pub imports: Option<Arc<Imports>>,
}

impl SidecarScope {
    fn of(sidecar: Option<&Sidecar>, ns: &str, mesh_mode: OutboundMode) -> Self {
        Self {
            sidecar: sidecar.map(Sidecar::id),
            gateway: None,
            selector: sidecar
                .and_then(|s| s.spec.workload_selector.as_ref())
                .map(|w| w.labels.clone()),
            mode: sidecar
                .and_then(|s| s.spec.outbound_traffic_policy.as_ref())
                .and_then(|p| p.mode)
                .unwrap_or(mesh_mode),
            imports: sidecar.map(|s| Arc::new(Imports::new(s, ns))),
        }
    }

    pub fn imports(&self, se_ns: &str, host: &str, port: u16) -> bool {
        self.imports
            .as_ref()
            .is_none_or(|i| i.imports(se_ns, host, port))
    }
}

/// The scopes of namespace `ns`: first its default (for workloads no Sidecar selects), then one
/// per selecting Sidecar in precedence order. Notes say where Istio would have been ambiguous.
pub fn scopes_for_namespace(
    ns: &str,
    sidecars: &[Sidecar],
    root_namespace: &str,
    mesh_mode: OutboundMode,
) -> (Vec<SidecarScope>, Vec<String>) {
    let mut in_ns: Vec<&Sidecar> = sidecars.iter().filter(|s| s.namespace == ns).collect();
    in_ns.sort_by(|a, b| a.age_key().cmp(&b.age_key()));
    let unselected = |list: &[&Sidecar]| -> Vec<String> {
        list.iter()
            .filter(|s| s.spec.workload_selector.is_none())
            .map(|s| s.id())
            .collect()
    };
    let mut notes = Vec::new();
    let own: Vec<String> = unselected(&in_ns);
    if own.len() > 1 {
        notes.push(format!(
            "namespace {ns} has more than one Sidecar without a workloadSelector ({}); using the oldest, {}",
            own.join(", "),
            own[0]
        ));
    }
    let mut root: Vec<&Sidecar> = sidecars
        .iter()
        .filter(|s| s.namespace == root_namespace && s.spec.workload_selector.is_none())
        .collect();
    root.sort_by(|a, b| a.age_key().cmp(&b.age_key()));
    let default = in_ns
        .iter()
        .find(|s| s.spec.workload_selector.is_none())
        .or(root.first())
        .copied();
    let mut scopes = vec![SidecarScope::of(default, ns, mesh_mode)];
    scopes.extend(
        in_ns
            .iter()
            .filter(|s| s.spec.workload_selector.is_some())
            .map(|s| SidecarScope::of(Some(s), ns, mesh_mode)),
    );
    (scopes, notes)
}

/// Whether labels satisfy a selector: every selector label is present with the same value.
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Istio's `SubsetOf` for an import pattern: `*` matches all; `*.example.com` matches names
/// under it (and `*.example.com` itself); a plain name matches itself.
fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" || pattern == host {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
        None => false,
    }
}

#[cfg(test)]
#[path = "sidecar_tests.rs"]
mod tests;
