//! Cross-object problems, as `istioctl analyze` reports them: each with a stable code, a message
//! and a suggested fix. Istio's codes are reused where the check is Istio's; `ENF` codes are
//! ours. Pure: DNS answers come in as inputs.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use serde::Serialize;

use super::{
    analyze_routing::analyze_routing, compile::visible_to, dns_names, is_opaque_tcp, sidecar,
    MeshSettings,
};
use crate::{
    diag::{Problem, Severity},
    istio::{
        DestinationRule, Gateway, Object, OutboundMode, Resolution, ServiceEntry, Sidecar,
        VirtualService, WorkloadEntry,
    },
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub code: &'static str,
    pub severity: Severity,
    /// `ServiceEntry shop/api`, or `namespace shop`.
    pub object: String,
    /// The file the object came from, if it is one object.
    pub origin: Option<String>,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "Error",
            Severity::Warning => "Warning",
        };
        write!(f, "{level} [{}] ({}", self.code, self.object)?;
        if let Some(origin) = &self.origin {
            write!(f, " {origin}")?;
        }
        write!(f, ") {}\n    fix: {}", self.message, self.fix)
    }
}

pub struct Subject<'a> {
    pub entries: &'a [ServiceEntry],
    pub workloads: &'a [WorkloadEntry],
    pub sidecars: &'a [Sidecar],
    pub gateways: &'a [Gateway],
    pub virtual_services: &'a [VirtualService],
    pub destination_rules: &'a [DestinationRule],
    pub mesh: &'a MeshSettings,
    /// Problems of single objects (validation), reported first.
    pub diagnostics: &'a [Problem],
    /// Namespaces known to exist besides those of the objects.
    pub namespaces: &'a BTreeSet<String>,
    /// Per name, its addresses or the resolver's error; `None` skips the DNS checks.
    pub dns: Option<&'a BTreeMap<String, Result<Vec<IpAddr>, String>>>,
    pub root_namespace: &'a str,
    pub istio_compat: bool,
}

pub fn analyze(s: &Subject<'_>) -> Vec<Finding> {
    let mut out: Vec<Finding> = s.diagnostics.iter().map(schema).collect();
    let mut existing: BTreeSet<String> = s.namespaces.clone();
    existing.extend(s.entries.iter().map(|e| e.namespace.clone()));
    existing.extend(s.workloads.iter().map(|e| e.namespace.clone()));
    existing.extend(s.sidecars.iter().map(|e| e.namespace.clone()));

    for se in s.entries {
        exported_nowhere(se, s, &existing, &mut out);
        selector_matches_nothing(se, s, &mut out);
        no_ports(se, &mut out);
        none_without_addresses(se, s.istio_compat, &mut out);
    }
    conflicting_resolution(s, &mut out);
    sidecar_conflicts(s.sidecars, &mut out);
    registry_only_without_entries(s, &existing, &mut out);
    analyze_routing(s, &mut out);
    if let Some(dns) = s.dns {
        unresolved(s, dns, &mut out);
    }
    out
}

pub(super) fn finding<T>(
    code: &'static str,
    severity: Severity,
    kind: &str,
    obj: &Object<T>,
    message: String,
    fix: impl Into<String>,
) -> Finding {
    Finding {
        code,
        severity,
        object: format!("{kind} {}", obj.id()),
        origin: Some(obj.origin.clone()),
        message,
        fix: fix.into(),
    }
}

fn schema(p: &Problem) -> Finding {
    Finding {
        code: "IST0106",
        severity: p.severity,
        object: p.object.clone(),
        origin: Some(p.file.clone()),
        message: format!("Schema validation error: {}: {}", p.field, p.message),
        fix: match p.severity {
            Severity::Error => {
                "correct the field; until then the object is skipped and allows nothing"
            }
            Severity::Warning => "the object is used as written; check that this is what you meant",
        }
        .to_string(),
    }
}

/// ENF0101: an entry no existing namespace can see allows nothing to anyone.
fn exported_nowhere(
    se: &ServiceEntry,
    s: &Subject<'_>,
    existing: &BTreeSet<String>,
    out: &mut Vec<Finding>,
) {
    let Some(visible) = visible_to(se, s.mesh) else {
        return;
    };
    if visible.iter().any(|ns| existing.contains(ns)) {
        return;
    }
    let list = s.mesh.export_to(se).join(", ");
    out.push(finding(
        "ENF0101",
        Severity::Warning,
        "ServiceEntry",
        se,
        format!("exportTo [{list}] names no namespace that exists, so no workload may use this entry"),
        "export it to the namespaces whose workloads call it (\".\" for its own, \"*\" for all), or create them",
    ));
}

/// ENF0105: a selector that selects no WorkloadEntry allows nothing, unless it is a Gateway's
/// service: its endpoints are the gateway's pods, which only the running agent sees.
fn selector_matches_nothing(se: &ServiceEntry, s: &Subject<'_>, out: &mut Vec<Finding>) {
    let Some(selector) = &se.spec.workload_selector else {
        return;
    };
    let any = s.workloads.iter().any(|we| {
        we.namespace == se.namespace && sidecar::selects(&selector.labels, &we.spec.labels)
    });
    let gateways_pods = s.gateways.iter().any(|g| {
        !g.spec.selector.is_empty() && sidecar::selects(&g.spec.selector, &selector.labels)
    });
    if !any && !gateways_pods {
        out.push(finding(
            "ENF0105",
            Severity::Warning,
            "ServiceEntry",
            se,
            format!(
                "workloadSelector {:?} matches no WorkloadEntry in namespace {}, so the entry allows nothing",
                selector.labels, se.namespace
            ),
            "add WorkloadEntries with these labels in the entry's namespace, or fix the selector",
        ));
    }
}

/// ENF0106: Istio accepts an entry without ports, but every rule is a port: it allows nothing.
fn no_ports(se: &ServiceEntry, out: &mut Vec<Finding>) {
    if se.spec.ports.is_empty() {
        out.push(finding(
            "ENF0106",
            Severity::Warning,
            "ServiceEntry",
            se,
            "the entry declares no ports, so it allows nothing".to_string(),
            "add spec.ports for the ports workloads connect to",
        ));
    }
}

/// IST0134: Istio needs addresses for TCP entries without them; enforcer differs (strict).
fn none_without_addresses(se: &ServiceEntry, istio_compat: bool, out: &mut Vec<Finding>) {
    let spec = &se.spec;
    if spec.resolution != Resolution::None || !spec.addresses.is_empty() {
        return;
    }
    let opaque: Vec<u32> = spec
        .ports
        .iter()
        .filter(|p| is_opaque_tcp(p.protocol.as_deref()))
        .map(|p| p.number)
        .collect();
    if opaque.is_empty() {
        return;
    }
    let effect = if istio_compat {
        "with --istio-compat any IP is allowed on them, as Istio does"
    } else {
        "Istio would allow any IP on them; enforcer allows the addresses its own lookups and workloads' DNS answers give for the hosts instead (strict)"
    };
    out.push(finding(
        "IST0134",
        Severity::Warning,
        "ServiceEntry",
        se,
        format!("resolution NONE without addresses on TCP ports {opaque:?}: {effect}"),
        "add spec.addresses (IPs or CIDRs), or use resolution DNS",
    ));
}

/// ENF0102: two entries visible to one namespace claim a host and port with different
/// resolutions; Istio picks one by age, enforcer allows the union.
fn conflicting_resolution(s: &Subject<'_>, out: &mut Vec<Finding>) {
    let mut claims: BTreeMap<(&str, u32), Vec<&ServiceEntry>> = BTreeMap::new();
    for se in s.entries {
        for host in &se.spec.hosts {
            for port in &se.spec.ports {
                claims.entry((host, port.number)).or_default().push(se);
            }
        }
    }
    let mut reported = BTreeSet::new();
    for ((host, port), list) in claims {
        for (i, a) in list.iter().enumerate() {
            for b in &list[i + 1..] {
                if a.spec.resolution == b.spec.resolution || !share_a_namespace(a, b, s.mesh) {
                    continue;
                }
                if !reported.insert((a.id(), b.id(), host)) {
                    continue;
                }
                out.push(finding(
                    "ENF0102",
                    Severity::Warning,
                    "ServiceEntry",
                    b,
                    format!(
                        "{host}:{port} is also declared by ServiceEntry {} with resolution {:?}, and this one says {:?}; Istio would use only the older one, enforcer allows what either allows",
                        a.id(), a.spec.resolution, b.spec.resolution
                    ),
                    "declare each host once per namespace, or make the resolutions agree",
                ));
            }
        }
    }
}

fn share_a_namespace(a: &ServiceEntry, b: &ServiceEntry, mesh: &MeshSettings) -> bool {
    match (visible_to(a, mesh), visible_to(b, mesh)) {
        (Some(x), Some(y)) => !x.is_disjoint(&y),
        (x, y) => x.is_none_or(|x| !x.is_empty()) && y.is_none_or(|y| !y.is_empty()),
    }
}

/// IST0111 (two Sidecars without a selector in one namespace) and IST0110 (two selecting
/// Sidecars that can select the same workload).
fn sidecar_conflicts(sidecars: &[Sidecar], out: &mut Vec<Finding>) {
    let mut by_ns: BTreeMap<&str, Vec<&Sidecar>> = BTreeMap::new();
    for sc in sidecars {
        by_ns.entry(&sc.namespace).or_default().push(sc);
    }
    for (ns, mut list) in by_ns {
        list.sort_by(|a, b| a.age_key().cmp(&b.age_key()));
        let unselected: Vec<&&Sidecar> = list
            .iter()
            .filter(|s| s.spec.workload_selector.is_none())
            .collect();
        if unselected.len() > 1 {
            for sc in &unselected {
                out.push(finding(
                    "IST0111",
                    Severity::Error,
                    "Sidecar",
                    sc,
                    format!(
                        "the namespace {ns} has multiple Sidecars without a workloadSelector; {} (the oldest) is used",
                        unselected[0].id()
                    ),
                    "keep one Sidecar without a workloadSelector per namespace",
                ));
            }
        }
        let selecting: Vec<(&Sidecar, &BTreeMap<String, String>)> = list
            .iter()
            .filter_map(|s| s.spec.workload_selector.as_ref().map(|w| (*s, &w.labels)))
            .collect();
        for (i, (a, sa)) in selecting.iter().enumerate() {
            for (b, sb) in &selecting[i + 1..] {
                let compatible = sa.iter().all(|(k, v)| sb.get(k).is_none_or(|w| w == v));
                if compatible {
                    let mut both = (*sa).clone();
                    both.extend(sb.iter().map(|(k, v)| (k.clone(), v.clone())));
                    out.push(finding(
                        "IST0110",
                        Severity::Error,
                        "Sidecar",
                        b,
                        format!(
                            "it and Sidecar {} can select the same workload (one labelled {both:?}); {} (the older) wins for it",
                            a.id(),
                            a.id()
                        ),
                        "make the workloadSelectors disjoint (a label key with different values)",
                    ));
                }
            }
        }
    }
}

/// ENF0104: a REGISTRY_ONLY namespace that imports no entry refuses everything but DNS.
fn registry_only_without_entries(
    s: &Subject<'_>,
    existing: &BTreeSet<String>,
    out: &mut Vec<Finding>,
) {
    for ns in existing {
        let (scopes, _) =
            sidecar::scopes_for_namespace(ns, s.sidecars, s.root_namespace, s.mesh.mode);
        let Some(scope) = scopes.first() else {
            continue;
        };
        if scope.mode != OutboundMode::RegistryOnly {
            continue;
        }
        let imports_any = s.entries.iter().any(|se| {
            visible_to(se, s.mesh).is_none_or(|v| v.contains(ns))
                && se.spec.hosts.iter().any(|h| {
                    se.spec.ports.iter().any(|p| {
                        u16::try_from(p.number).is_ok_and(|n| scope.imports(&se.namespace, h, n))
                    })
                })
        });
        if !imports_any {
            out.push(Finding {
                code: "ENF0104",
                severity: Severity::Warning,
                object: format!("namespace {ns}"),
                origin: None,
                message: format!(
                    "mode REGISTRY_ONLY{} but no ServiceEntry is visible to it: every outbound connection except DNS and loopback is refused",
                    scope.sidecar.as_ref().map_or(String::new(), |s| format!(" (Sidecar {s})"))
                ),
                fix: "add ServiceEntries exported to it, or set ALLOW_ANY if it is meant to be open".to_string(),
            });
        }
    }
}

/// ENF0103: a name the agent must resolve does not resolve, so its entry allows nothing.
fn unresolved(
    s: &Subject<'_>,
    dns: &BTreeMap<String, Result<Vec<IpAddr>, String>>,
    out: &mut Vec<Finding>,
) {
    for se in s.entries {
        let names = dns_names(std::slice::from_ref(se), s.workloads, s.istio_compat);
        for name in names {
            let problem = match dns.get(&name) {
                Some(Ok(ips)) if !ips.is_empty() => continue,
                Some(Err(err)) => err.clone(),
                _ => "no addresses".to_string(),
            };
            out.push(finding(
                "ENF0103",
                Severity::Warning,
                "ServiceEntry",
                se,
                format!("{name} does not resolve ({problem}), so nothing is allowed for it until it does"),
                "check the name and the DNS server the agent uses (--dns-server)",
            ));
        }
    }
}

#[cfg(test)]
#[path = "analyze_tests.rs"]
mod tests;
