//! ServiceEntries, mesh settings and DNS answers to per-namespace rules.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use ipnet::IpNet;

use super::{
    is_opaque_tcp, l4_of_protocol, model::scope_name, sidecar, Desired, HostRef, MeshSettings,
    Origin, Rule, ScopePolicy, L4,
};
use crate::{
    istio::{OutboundMode, Port, Resolution, ServiceEntry, Sidecar, WorkloadEntry},
    net::parse_ip_or_cidr,
};

pub struct Inputs<'a> {
    /// Only valid objects: see `validate_service_entry`.
    pub service_entries: &'a [ServiceEntry],
    pub mesh: &'a MeshSettings,
    /// Namespaces that have workloads (cgroups). Namespaces named by objects are added.
    pub namespaces: &'a BTreeSet<String>,
    /// Current DNS answers by name. A missing name allows nothing.
    pub dns: &'a BTreeMap<String, Vec<IpAddr>>,
    /// Resolvers every workload may reach (the agent's, on their port).
    pub dns_servers: &'a [SocketAddr],
    pub allow_cidrs: &'a [IpNet],
    /// Istio's reading of `resolution: NONE` without addresses: any IP on an opaque TCP port.
    pub istio_compat: bool,
    /// Only valid objects.
    pub sidecars: &'a [Sidecar],
    /// Only valid objects; selected by a ServiceEntry's `workloadSelector`.
    pub workload_entries: &'a [WorkloadEntry],
    /// Where a Sidecar without a selector sets the default for every namespace.
    pub root_namespace: &'a str,
    /// Compile the scopes of these namespaces only: a node needs those of the workloads it
    /// runs, and every namespace's scope would multiply the cluster's Services by its
    /// namespaces. `None`: every namespace.
    pub only_namespaces: Option<&'a BTreeSet<String>>,
    /// Gateways, VirtualServices and DestinationRules.
    pub routing: super::gateway::Routing<'a>,
}

/// The names the agent must resolve for these ServiceEntries.
/// The names of DNS endpoints (WorkloadEntries and `endpoints` given by name), which only
/// the agent resolves: workloads connect to the entry's hosts, not to these.
pub fn endpoint_names(entries: &[ServiceEntry], workloads: &[WorkloadEntry]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for se in entries {
        if !matches!(
            se.spec.resolution,
            Resolution::Dns | Resolution::DnsRoundRobin
        ) {
            continue;
        }
        if let Some(eps) = endpoints_of(se, workloads) {
            names.extend(
                eps.iter()
                    .filter_map(|ep| ep.address)
                    .filter(|a| is_name(a))
                    .map(str::to_string),
            );
        }
    }
    names
}

pub fn dns_names(
    entries: &[ServiceEntry],
    workloads: &[WorkloadEntry],
    istio_compat: bool,
) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for se in entries {
        let spec = &se.spec;
        let endpoints = endpoints_of(se, workloads);
        match spec.resolution {
            Resolution::Dns | Resolution::DnsRoundRobin => match endpoints {
                Some(eps) => names.extend(
                    eps.iter()
                        .filter_map(|ep| ep.address)
                        .filter(|a| is_name(a))
                        .map(str::to_string),
                ),
                None => names.extend(spec.hosts.iter().filter(|h| is_name(h)).cloned()),
            },
            Resolution::None if spec.addresses.is_empty() => {
                let all_opaque = spec
                    .ports
                    .iter()
                    .all(|p| is_opaque_tcp(p.protocol.as_deref()));
                if !(istio_compat && all_opaque) {
                    names.extend(spec.hosts.iter().filter(|h| is_name(h)).cloned());
                }
            }
            Resolution::None | Resolution::Static => {}
        }
    }
    names
}

/// An endpoint of a ServiceEntry: inline in `endpoints`, or a WorkloadEntry it selects.
pub(super) struct EndpointRef<'a> {
    pub address: Option<&'a str>,
    pub ports: &'a BTreeMap<String, u32>,
    pub labels: &'a BTreeMap<String, String>,
}

/// The entry's endpoints, or `None` when it has neither `endpoints` nor a `workloadSelector`
/// (then its hosts are the endpoints). A selector picks the WorkloadEntries of the entry's
/// namespace whose labels include all of the selector's.
pub(super) fn endpoints_of<'a>(
    se: &'a ServiceEntry,
    workloads: &'a [WorkloadEntry],
) -> Option<Vec<EndpointRef<'a>>> {
    if let Some(selector) = &se.spec.workload_selector {
        let selected = workloads.iter().filter(|we| {
            we.namespace == se.namespace
                && selector
                    .labels
                    .iter()
                    .all(|(k, v)| we.spec.labels.get(k) == Some(v))
        });
        return Some(
            selected
                .map(|we| EndpointRef {
                    address: we.spec.address.as_deref(),
                    ports: &we.spec.ports,
                    labels: &we.spec.labels,
                })
                .collect(),
        );
    }
    if se.spec.endpoints.is_empty() {
        return None;
    }
    Some(
        se.spec
            .endpoints
            .iter()
            .map(|ep| EndpointRef {
                address: ep.address.as_deref(),
                ports: &ep.ports,
                labels: &ep.labels,
            })
            .collect(),
    )
}

fn is_name(s: &str) -> bool {
    !s.starts_with('*') && !s.starts_with("unix://") && s.parse::<IpAddr>().is_err()
}

pub fn compile(inp: &Inputs<'_>) -> Desired {
    compile_named(inp, scope_name)
}

/// [`compile`], with the names of scopes given by `name_of` (tests make names collide).
fn compile_named(inp: &Inputs<'_>, name_of: fn(&str, Option<&str>) -> String) -> Desired {
    let mut all: BTreeSet<String> = inp.namespaces.clone();
    for se in inp.service_entries {
        all.insert(se.namespace.clone());
        all.extend(
            inp.mesh
                .export_to(se)
                .into_iter()
                .filter(|v| !matches!(*v, "." | "*" | "~"))
                .map(str::to_string),
        );
    }
    all.extend(inp.sidecars.iter().map(|s| s.namespace.clone()));
    if let Some(only) = inp.only_namespaces {
        all.retain(|ns| only.contains(ns));
    }

    let mut out = Desired::default();
    let dns_origin = Arc::new(Origin::builtin("DNS server"));
    // Per namespace, the names of its scopes: the namespace's own first.
    let mut scopes_of: BTreeMap<&String, Vec<String>> = BTreeMap::new();
    // Per scope name, what it is the scope of: a namespace, or a Sidecar (`namespace/name`).
    // Long names are shortened with a hash, so two Sidecars' scopes can share one: then
    // neither policy may stand in for the other's.
    let mut owners: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for ns in &all {
        let (mut scopes, mut notes) =
            sidecar::scopes_for_namespace(ns, inp.sidecars, inp.root_namespace, inp.mesh.mode);
        out.notes.append(&mut notes);
        // Gateway workloads are chosen before any Sidecar's: a Sidecar does not apply to them.
        let (gateways, mut notes) = super::gateway::gateway_scopes(ns, &inp.routing);
        out.notes.append(&mut notes);
        scopes.splice(1..1, gateways);
        for sc in scopes {
            let selector = sc.selector.clone();
            let (name, owner) = match &selector {
                None => (ns.clone(), ns.clone()),
                Some(labels) if sc.gateway.is_some() => {
                    let label = super::gateway::scope_label(labels);
                    (name_of(ns, Some(&label)), format!("{ns}/{label}"))
                }
                Some(_) => (
                    name_of(
                        ns,
                        sc.sidecar
                            .as_deref()
                            .and_then(|id| id.split_once('/'))
                            .map(|(_, n)| n),
                    ),
                    sc.sidecar.clone().unwrap_or_else(|| ns.clone()),
                ),
            };
            let owned = owners.entry(name.clone()).or_default();
            owned.push(owner);
            if owned.len() > 1 {
                // Keep the first policy for now; `refuse_shared_names` replaces it.
                out.selectors
                    .entry(ns.clone())
                    .or_default()
                    .extend(selector.map(|s| (s, name.clone())));
                continue;
            }
            let mut scope = ScopePolicy {
                namespace: ns.clone(),
                sidecar: sc.sidecar,
                mode: if inp.mesh.audit_namespaces.contains(ns) {
                    OutboundMode::Audit
                } else {
                    sc.mode
                },
                rules: BTreeMap::new(),
                imports: sc.imports,
                learn: Vec::new(),
                gateway: sc.gateway,
                redirects: BTreeMap::new(),
            };
            for &server in inp.dns_servers {
                for l4 in [L4::Udp, L4::Tcp] {
                    scope
                        .rules
                        .entry(Rule::host(l4, server.port(), server.ip()))
                        .or_default()
                        .push(Arc::clone(&dns_origin));
                }
            }
            if let Some(selector) = selector {
                out.selectors
                    .entry(ns.clone())
                    .or_default()
                    .push((selector, name.clone()));
            }
            scopes_of.entry(ns).or_default().push(name.clone());
            out.scopes.insert(name, scope);
        }
    }
    let shared = refuse_shared_names(&mut out, &owners);
    for names in scopes_of.values_mut() {
        names.retain(|n| !shared.contains(n));
    }
    out.global.extend(
        ["127.0.0.0/8", "::1/128"]
            .iter()
            .filter_map(|s| parse_ip_or_cidr(s)),
    );
    // Canonical as rules are, so that `explain` and the maps read `--allow-cidr` alike.
    out.global
        .extend(inp.allow_cidrs.iter().map(|&net| super::canonical_net(net)));

    for se in inp.service_entries {
        let visible = visible_to(se, inp.mesh);
        let mut entry = EntryRules::new(se, inp.workload_entries, inp.dns);
        entry.collect(inp.istio_compat);
        let has_endpoints = endpoints_of(se, inp.workload_entries).is_some();
        let learning = super::learn::entry_learning(se, has_endpoints, inp.istio_compat);
        out.notes.append(&mut entry.notes);

        let mut refs: BTreeMap<&str, Arc<HostRef>> = BTreeMap::new();
        for emitted in &entry.out {
            if let Some(host) = emitted.origin.host.as_deref() {
                let r = refs.entry(host).or_insert_with(|| {
                    Arc::new(HostRef {
                        host: host.to_string(),
                        service_entry: se.id(),
                        visible_to: visible.clone(),
                    })
                });
                add_unique(
                    out.hosts_by_ip.entry(emitted.rule.net.addr()).or_default(),
                    r,
                );
            }
        }
        let targets: Vec<&String> = match &visible {
            None => all.iter().collect(),
            Some(set) => set.iter().collect(),
        };
        for ns in targets {
            for name in scopes_of.get(ns).into_iter().flatten() {
                let Some(scope) = out.scopes.get_mut(name) else {
                    continue;
                };
                let imports = scope.imports.clone();
                for emitted in &entry.out {
                    let imported = imports.as_ref().is_none_or(|i| match emitted.for_host {
                        Some(host) => i.imports(&se.namespace, host, emitted.service_port),
                        None => se
                            .spec
                            .hosts
                            .iter()
                            .any(|h| i.imports(&se.namespace, h, emitted.service_port)),
                    });
                    if imported {
                        add_unique(
                            scope.rules.entry(emitted.rule).or_default(),
                            &emitted.origin,
                        );
                    }
                }
                scope.learn.extend(learning.iter().filter_map(|l| {
                    l.rule_for(|host| {
                        imports
                            .as_ref()
                            .is_none_or(|i| i.imports(&se.namespace, host, l.service_port))
                    })
                }));
            }
        }
    }
    let mut notes = super::gateway::add_redirects(&mut out, inp);
    out.notes.append(&mut notes);
    out.notes.sort();
    out.notes.dedup();
    out
}

/// Fails closed where two scopes got one name: that name's scope refuses everything (no rules,
/// REGISTRY_ONLY; only the global CIDRs stay), so the workloads of both are refused rather than
/// one getting the other's policy, and a note names both. Returns the names.
fn refuse_shared_names(
    out: &mut Desired,
    owners: &BTreeMap<String, Vec<String>>,
) -> BTreeSet<String> {
    let mut shared = BTreeSet::new();
    for (name, owned) in owners.iter().filter(|(_, o)| o.len() > 1) {
        let who: Vec<String> = owned
            .iter()
            .map(|o| {
                if o.contains('/') {
                    format!("Sidecar {o}")
                } else {
                    format!("namespace {o}")
                }
            })
            .collect();
        out.notes.push(format!(
            "{} have one scope name, {name} (a hash of long names collided); their workloads are refused everything: rename one",
            who.join(" and ")
        ));
        if let Some(scope) = out.scopes.get_mut(name) {
            *scope = ScopePolicy {
                namespace: scope.namespace.clone(),
                // Refusal records say "(Sidecar {this} in force)".
                sidecar: Some(format!("{}, sharing one scope name,", owned.join(" and "))),
                mode: OutboundMode::RegistryOnly,
                rules: BTreeMap::new(),
                imports: None,
                ..ScopePolicy::default()
            };
        }
        shared.insert(name.clone());
    }
    shared
}

/// The namespaces a ServiceEntry is visible to; `None` means all of them.
pub fn visible_to(se: &ServiceEntry, mesh: &MeshSettings) -> Option<BTreeSet<String>> {
    let list = mesh.export_to(se);
    if list.contains(&"*") {
        return None;
    }
    Some(
        list.into_iter()
            .filter(|v| *v != "~")
            .map(|v| {
                if v == "." {
                    se.namespace.clone()
                } else {
                    v.to_string()
                }
            })
            .collect(),
    )
}

fn add_unique<T: PartialEq>(list: &mut Vec<Arc<T>>, item: &Arc<T>) {
    if !list.iter().any(|x| Arc::ptr_eq(x, item) || **x == **item) {
        list.push(Arc::clone(item));
    }
}

/// One rule a ServiceEntry asks for, with what a Sidecar's imports are checked against.
struct Emitted<'a> {
    rule: Rule,
    /// The entry's port (not `targetPort`): Sidecar listeners match service ports.
    service_port: u16,
    /// The entry host whose resolution produced the rule; `None` for what all its hosts share
    /// (endpoints, `addresses`).
    for_host: Option<&'a str>,
    origin: Arc<Origin>,
}

/// The rules one ServiceEntry asks for, sharing one origin per host.
struct EntryRules<'a> {
    se: &'a ServiceEntry,
    workloads: &'a [WorkloadEntry],
    dns: &'a BTreeMap<String, Vec<IpAddr>>,
    origins: BTreeMap<Option<&'a str>, Arc<Origin>>,
    out: Vec<Emitted<'a>>,
    notes: Vec<String>,
    /// The port being collected.
    service_port: u16,
}

impl<'a> EntryRules<'a> {
    fn new(
        se: &'a ServiceEntry,
        workloads: &'a [WorkloadEntry],
        dns: &'a BTreeMap<String, Vec<IpAddr>>,
    ) -> Self {
        Self {
            se,
            workloads,
            dns,
            origins: BTreeMap::new(),
            out: Vec::new(),
            notes: Vec::new(),
            service_port: 0,
        }
    }

    /// `host` names the origin; `for_host` is the entry host the rule belongs to, if only one.
    fn push(&mut self, rule: Rule, host: Option<&'a str>, for_host: Option<&'a str>) {
        let se = self.se;
        let origin = self.origins.entry(host).or_insert_with(|| {
            Arc::new(Origin {
                service_entry: se.id(),
                host: host.map(str::to_string),
            })
        });
        self.out.push(Emitted {
            rule,
            service_port: self.service_port,
            for_host,
            origin: Arc::clone(origin),
        });
    }

    /// Every address `name` resolves to, on `ports`; a note when it has none yet. `own` says
    /// whether `name` is one of the entry's hosts (rather than an endpoint's address).
    fn resolved(&mut self, name: &'a str, l4: L4, ports: &[u16], own: bool) {
        let dns = self.dns;
        match dns.get(name) {
            Some(ips) if !ips.is_empty() => {
                for ip in ips {
                    for &port in ports {
                        self.push(Rule::host(l4, port, *ip), Some(name), own.then_some(name));
                    }
                }
            }
            _ => self.notes.push(format!(
                "ServiceEntry {}: {name} has no DNS answer yet; nothing is allowed for it",
                self.se.id()
            )),
        }
    }

    fn collect(&mut self, istio_compat: bool) {
        let spec = &self.se.spec;
        let endpoints = endpoints_of(self.se, self.workloads);
        if spec.workload_selector.is_some() && endpoints.as_ref().is_some_and(Vec::is_empty) {
            self.notes.push(format!(
                "ServiceEntry {}: workloadSelector matches no WorkloadEntry in namespace {}; nothing is allowed for it",
                self.se.id(),
                self.se.namespace
            ));
        }
        // Literal addresses belong to the entry's hosts as much as resolved ones do.
        let declared = spec.hosts.first().map(String::as_str);
        for port in &spec.ports {
            let Some(l4) = l4_of_protocol(port.protocol.as_deref()) else {
                continue;
            };
            let (number, target) = port_numbers(port);
            self.service_port = number;
            for addr in &spec.addresses {
                if let Some(net) = parse_ip_or_cidr(addr) {
                    self.push(Rule::new(l4, number, net), declared, None);
                }
            }
            let host_ports: &[u16] = if target == number {
                &[number]
            } else {
                &[number, target]
            };
            match (spec.resolution, &endpoints) {
                (
                    Resolution::Static | Resolution::Dns | Resolution::DnsRoundRobin,
                    Some(endpoints),
                ) => {
                    for ep in endpoints {
                        let Some(addr) = ep.address else {
                            continue;
                        };
                        let ep_port = port
                            .name
                            .as_ref()
                            .and_then(|n| ep.ports.get(n))
                            .map_or(target, |&p| p as u16);
                        if let Ok(ip) = addr.parse::<IpAddr>() {
                            self.push(Rule::host(l4, ep_port, ip), declared, None);
                        } else if is_name(addr) {
                            self.resolved(addr, l4, &[ep_port], false);
                        }
                    }
                }
                (Resolution::Dns | Resolution::DnsRoundRobin, None) => {
                    for host in spec.hosts.iter().filter(|h| is_name(h)) {
                        self.resolved(host, l4, host_ports, true);
                    }
                }
                (Resolution::None, _) if spec.addresses.is_empty() => {
                    if istio_compat && is_opaque_tcp(port.protocol.as_deref()) {
                        for any in ["0.0.0.0/0", "::/0"] {
                            if let Some(net) = parse_ip_or_cidr(any) {
                                self.push(Rule::new(l4, number, net), None, None);
                            }
                        }
                    } else {
                        for host in &spec.hosts {
                            if is_name(host) {
                                self.resolved(host, l4, &[number], true);
                            } else {
                                self.notes.push(format!(
                                    "ServiceEntry {}: wildcard host {host}: only addresses in workloads' own DNS answers are allowed for it (nothing with --dns-allow resolved)",
                                    self.se.id()
                                ));
                            }
                        }
                    }
                }
                (Resolution::None | Resolution::Static, _) => {}
            }
        }
    }
}

/// The service port, and the port endpoints receive on.
pub(super) fn port_numbers(port: &Port) -> (u16, u16) {
    // Validation guarantees both are in 1..=65535.
    let number = u16::try_from(port.number).unwrap_or(0);
    let target = port
        .target_port
        .and_then(|t| u16::try_from(t).ok())
        .unwrap_or(number);
    (number, target)
}

#[cfg(test)]
#[path = "compile_tests.rs"]
mod tests;
