//! Egress gateways, as Istio routes through them (`research/egress-gateway.md`):
//!
//! - a VirtualService bound to `mesh` that sends a host's port to a gateway's service makes the
//!   kernel rewrite a workload's `connect()` there (a [`GatewayRoute`] per address and port);
//! - the workloads a Gateway's selector chooses get a scope of their own, which reaches only
//!   the destinations of the routes bound to that Gateway and is never redirected.
//!
//! Only static predicates are decided here (gateways, port, source namespace), as Istio does
//! when it builds a sidecar's config; SNI and Host are left to the gateway's proxy, which sees
//! the application's own bytes.
//!
//! Routes are read through `route_view`, with the analyzer: which destination is a
//! gateway's service (`gateway_behind`) and which DestinationRule applies are decided there
//! once, so that `enforcer analyze` warns of exactly what is enforced here.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::{
    compile::{endpoints_of, port_numbers, visible_to, Inputs},
    model::{GatewayRoute, Labels, RedirectKey, Via},
    route_view::{destination_rule, fqdn, gateway_behind, routes_of, Match},
    sidecar::{selects, Imports, SidecarScope},
    Desired, Origin, Rule, L4,
};
use crate::istio::{
    routing::Destination, DestinationRule, Gateway, OutboundMode, ServiceEntry, VirtualService,
};

/// The routing objects, valid ones only.
#[derive(Clone, Copy, Debug, Default)]
pub struct Routing<'a> {
    pub gateways: &'a [Gateway],
    pub virtual_services: &'a [VirtualService],
    pub destination_rules: &'a [DestinationRule],
    /// `--egress-gateway-only`: every other port and protocol of a gateway-routed address is
    /// refused to non-gateway workloads (egress gateway plus NetworkPolicy, in one).
    pub gateway_only: bool,
    /// Istio's defaults across namespaces: a Gateway's selector chooses workloads in every
    /// namespace (`PILOT_SCOPE_GATEWAY_TO_NAMESPACE=false`), and a VirtualService redirects
    /// every namespace it is exported to. Otherwise a Gateway chooses in its own namespace, and
    /// a VirtualService redirects its own namespace (from the root namespace, all it is
    /// exported to): no tenant makes its pods gateway workloads by labelling them, or sends
    /// another namespace's connections to its own pods.
    pub any_namespace: bool,
}

/// Whether a VirtualService applies in `ns`: no `exportTo` means every namespace.
fn vs_visible(vs: &VirtualService, ns: &str) -> bool {
    vs.spec.export_to.as_ref().is_none_or(|list| {
        list.iter()
            .any(|e| e == "*" || e == ns || (e == "." && vs.namespace == ns))
    })
}

/// Oldest first, as Istio orders conflicting objects.
fn by_age<T>(objects: &[crate::istio::Object<T>]) -> Vec<&crate::istio::Object<T>> {
    let mut sorted: Vec<_> = objects.iter().collect();
    sorted.sort_by(|a, b| a.age_key().cmp(&b.age_key()));
    sorted
}

/// The scopes of gateway workloads in namespace `ns`: one per distinct Gateway selector, the
/// oldest Gateway's first. Each imports exactly the destinations of the routes bound to the
/// Gateways with that selector, and is REGISTRY_ONLY whatever the mesh says: a gateway forwards
/// only what is routed (Istio's 404 NR, 503 NC).
pub fn gateway_scopes(ns: &str, routing: &Routing<'_>) -> (Vec<SidecarScope>, Vec<String>) {
    let mut groups: Vec<(Labels, Vec<String>)> = Vec::new();
    let mut notes = Vec::new();
    let chooses_here = |gw: &&Gateway| routing.any_namespace || gw.namespace == ns;
    for gw in by_age(routing.gateways).into_iter().filter(chooses_here) {
        if gw.spec.selector.is_empty() {
            notes.push(format!(
                "Gateway {}: an empty selector chooses no workload here (every workload would escape its policy)",
                gw.id()
            ));
            continue;
        }
        match groups.iter_mut().find(|(s, _)| *s == gw.spec.selector) {
            Some((_, ids)) => ids.push(gw.id()),
            None => groups.push((gw.spec.selector.clone(), vec![gw.id()])),
        }
    }
    let scopes = groups
        .into_iter()
        .map(|(selector, ids)| {
            let routed = routed_destinations(ns, &ids, routing);
            SidecarScope {
                sidecar: None,
                gateway: Some(format!("Gateway {}", ids.join(", "))),
                selector: Some(selector),
                mode: OutboundMode::RegistryOnly,
                imports: Some(Arc::new(Imports::routed(routed))),
            }
        })
        .collect();
    (scopes, notes)
}

/// The name of a gateway scope: one no Sidecar can have (`:` and `=` are not in DNS names).
pub fn scope_label(selector: &Labels) -> String {
    let text: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("gateway:{}", text.join(","))
}

/// The destinations (host, and port when the route names one) of every route bound to one of
/// the Gateways `ids`, as a gateway workload in `ns` sees them.
fn routed_destinations(
    ns: &str,
    ids: &[String],
    routing: &Routing<'_>,
) -> Vec<(String, Option<u16>)> {
    let mut out = Vec::new();
    for vs in routing
        .virtual_services
        .iter()
        .filter(|v| vs_visible(v, ns))
    {
        for route in routes_of(vs) {
            let bound = route
                .matches
                .iter()
                .any(|m| ids.iter().any(|id| m.gateways.contains(id)));
            if !bound {
                continue;
            }
            for (_, d) in &route.destinations {
                let port = d.port.and_then(|p| u16::try_from(p.number).ok());
                out.push((d.host.clone(), port.filter(|&p| p != 0)));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Adds, to every scope that is not a gateway's, the redirects of the mesh routes it is
/// subject to, and allows it the gateways' addresses. Returns notes.
pub fn add_redirects(out: &mut Desired, inp: &Inputs<'_>) -> Vec<String> {
    let mut notes = Vec::new();
    let names: Vec<String> = out.scopes.keys().cloned().collect();
    for name in names {
        let Some(scope) = out.scopes.get(&name) else {
            continue;
        };
        if scope.gateway.is_some() {
            continue;
        }
        let ns = scope.namespace.clone();
        let found = mesh_redirects(&ns, inp, &mut notes);
        let Some(scope) = out.scopes.get_mut(&name) else {
            continue;
        };
        for (key, route) in found {
            if let Via::Gateway(targets) = &route.via {
                let origin = Arc::new(Origin {
                    service_entry: format!(
                        "(VirtualService {}: the endpoints of egress gateway {})",
                        route.virtual_service, route.gateway
                    ),
                    host: None,
                });
                for t in targets {
                    scope
                        .rules
                        .entry(Rule::host(L4::Tcp, t.port(), t.ip()))
                        .or_default()
                        .push(Arc::clone(&origin));
                }
            }
            for rule in &mut scope.learn {
                if rule.hosts.covers(&route.host) {
                    // A learned address of a routed host would go around the gateway.
                    rule.ports
                        .retain(|&(l4, p)| !(key.port == 0 || (l4 == L4::Tcp && p == key.port)));
                }
            }
            scope.redirects.entry(key).or_insert(route);
        }
        scope.learn.retain(|r| !r.ports.is_empty());
    }
    notes.sort();
    notes.dedup();
    notes
}

/// The redirects of namespace `ns`'s mesh routes: each destination `gateway_behind` takes
/// for a Gateway's service.
fn mesh_redirects(
    ns: &str,
    inp: &Inputs<'_>,
    notes: &mut Vec<String>,
) -> Vec<(RedirectKey, Arc<GatewayRoute>)> {
    let routing = &inp.routing;
    let mut out = Vec::new();
    for vs in by_age(routing.virtual_services) {
        if !vs_visible(vs, ns) {
            continue;
        }
        let trusted =
            routing.any_namespace || vs.namespace == ns || vs.namespace == inp.root_namespace;
        for route in routes_of(vs) {
            for m in &route.matches {
                if m.source_namespace.is_some_and(|s| s != ns) {
                    continue;
                }
                for (_, dest) in &route.destinations {
                    let Some(gateway) = gateway_behind(vs, m, dest, routing.gateways) else {
                        continue;
                    };
                    if !trusted {
                        notes.push(format!(
                            "VirtualService {}: its mesh routes redirect only namespace {} (and every namespace from the root namespace {}); namespace {ns} is not redirected (--gateway-any-namespace follows Istio)",
                            vs.id(),
                            vs.namespace,
                            inp.root_namespace
                        ));
                        continue;
                    }
                    if !m.source_labels.is_empty() {
                        notes.push(format!(
                            "VirtualService {}: a mesh match with sourceLabels is not redirected (scopes are not split by source labels)",
                            vs.id()
                        ));
                        continue;
                    }
                    let ctx = RouteCtx { ns, vs, gateway, m };
                    out.extend(ctx.redirects(dest, inp));
                }
            }
        }
    }
    out
}

/// One mesh match of one VirtualService, in one namespace.
struct RouteCtx<'a> {
    ns: &'a str,
    vs: &'a VirtualService,
    gateway: &'a Gateway,
    m: &'a Match<'a>,
}

impl RouteCtx<'_> {
    /// The redirects one destination of the match makes: each routed address, on each routed
    /// port, to the gateway's endpoints.
    fn redirects(
        &self,
        dest: &Destination,
        inp: &Inputs<'_>,
    ) -> Vec<(RedirectKey, Arc<GatewayRoute>)> {
        let mut out = Vec::new();
        for host in self.m.hosts(self.vs) {
            let ips = addresses(host, self.ns, inp);
            for port in self.ports(host, inp) {
                let via = self.via(dest, port, inp);
                let route = Arc::new(GatewayRoute {
                    virtual_service: self.vs.id(),
                    gateway: self.gateway.id(),
                    host: host.clone(),
                    via,
                });
                for &ip in &ips {
                    out.push((RedirectKey { port, ip }, Arc::clone(&route)));
                    if inp.routing.gateway_only {
                        let only = GatewayRoute {
                            via: Via::GatewayOnly,
                            ..(*route).clone()
                        };
                        out.push((RedirectKey { port: 0, ip }, Arc::new(only)));
                    }
                }
            }
        }
        out
    }

    /// The match's port, else the TCP ports the host's visible ServiceEntries declare, else
    /// 80 (Istio routes port 80 to hosts outside the registry).
    fn ports(&self, host: &str, inp: &Inputs<'_>) -> Vec<u16> {
        if let Some(p) = self.m.port.and_then(|p| u16::try_from(p).ok()) {
            return vec![p];
        }
        let mut ports: Vec<u16> = entries_for(host, self.ns, inp)
            .flat_map(|se| se.spec.ports.iter())
            .filter(|p| super::l4_of_protocol(p.protocol.as_deref()) == Some(L4::Tcp))
            .map(|p| port_numbers(p).0)
            .collect();
        if ports.is_empty() {
            ports.push(80);
        }
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Where a connection to `port` goes: the gateway service's endpoints (filtered by the
    /// subset's labels) on their port for the destination port, or a refusal saying why not.
    fn via(&self, dest: &Destination, port: u16, inp: &Inputs<'_>) -> Via {
        let q = dest
            .port
            .and_then(|p| u16::try_from(p.number).ok())
            .filter(|&p| p != 0)
            .unwrap_or(port);
        let Some(service) = entries_for(&dest.host, self.ns, inp).next() else {
            return Via::Refused(format!(
                "the gateway service {} is not in the registry visible to namespace {}",
                dest.host, self.ns
            ));
        };
        let rule = destination_rule(
            inp.routing.destination_rules,
            &fqdn(&dest.host, &self.vs.namespace),
            self.ns,
            Some(&service.namespace),
            inp.root_namespace,
        );
        let subset_labels = match (&dest.subset, rule) {
            (None, _) => None,
            (Some(name), Some(dr)) => match dr.spec.subsets.iter().find(|s| s.name == *name) {
                Some(subset) => Some(&subset.labels),
                None => return Via::Refused(missing_subset(name, &dest.host)),
            },
            (Some(name), None) => return Via::Refused(missing_subset(name, &dest.host)),
        };
        if let Some(why) = rule.and_then(|dr| client_tls(dr, dest.subset.as_deref(), q)) {
            return Via::Refused(why);
        }
        let targets = targets(service, q, subset_labels, inp);
        if targets.is_empty() {
            return Via::Refused(format!(
                "the gateway service {} has no endpoint on port {q}",
                dest.host
            ));
        }
        Via::Gateway(targets)
    }
}

fn missing_subset(name: &str, host: &str) -> String {
    format!("no DestinationRule defines subset {name} of {host}")
}

/// Why a DestinationRule's client TLS setting cannot be honoured: the client would have to
/// originate TLS towards the gateway, which no kernel hook can do.
fn client_tls(dr: &DestinationRule, subset: Option<&str>, port: u16) -> Option<String> {
    let subset_policy = subset
        .and_then(|name| dr.spec.subsets.iter().find(|s| s.name == name))
        .and_then(|s| s.traffic_policy.as_ref());
    let mode = subset_policy
        .and_then(|p| p.tls_mode_for(port.into()))
        .or_else(|| {
            dr.spec
                .traffic_policy
                .as_ref()
                .and_then(|p| p.tls_mode_for(port.into()))
        })?;
    matches!(mode, "SIMPLE" | "MUTUAL" | "ISTIO_MUTUAL").then(|| {
        format!(
            "DestinationRule {} makes clients originate TLS ({mode}) to the gateway; the kernel cannot, so the connection is refused",
            dr.id()
        )
    })
}

/// The ServiceEntries (and Services) that declare `host` and are visible to `ns`.
fn entries_for<'a>(
    host: &'a str,
    ns: &'a str,
    inp: &'a Inputs<'_>,
) -> impl Iterator<Item = &'a ServiceEntry> + 'a {
    inp.service_entries.iter().filter(move |se| {
        se.spec.hosts.iter().any(|h| h == host)
            && visible_to(se, inp.mesh).is_none_or(|set| set.contains(ns))
    })
}

/// The addresses of a routed host: itself if it is one, else the agent's answers for it and
/// the single addresses of the entries visible to `ns` that declare it (a CIDR cannot be
/// redirected to one gateway address; its connections stay as the entry says).
fn addresses(host: &str, ns: &str, inp: &Inputs<'_>) -> Vec<IpAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return vec![super::canonical_ip(ip)];
    }
    let declared = entries_for(host, ns, inp)
        .flat_map(|se| se.spec.addresses.iter())
        .filter_map(|a| a.parse::<IpAddr>().ok());
    let mut ips: Vec<IpAddr> = inp
        .dns
        .get(host)
        .into_iter()
        .flatten()
        .copied()
        .chain(declared)
        .map(super::canonical_ip)
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// The gateway service's endpoints for service port `q`, on the port each listens on; the
/// service's own addresses (a ClusterIP) on `q` when it has no endpoints listed.
fn targets(
    service: &ServiceEntry,
    q: u16,
    subset: Option<&Labels>,
    inp: &Inputs<'_>,
) -> Vec<SocketAddr> {
    let Some(port) = service.spec.ports.iter().find(|p| port_numbers(p).0 == q) else {
        return Vec::new();
    };
    let target = port_numbers(port).1;
    let mut out: Vec<SocketAddr> = match endpoints_of(service, inp.workload_entries) {
        Some(endpoints) => endpoints
            .iter()
            .filter(|ep| subset.is_none_or(|labels| selects(labels, ep.labels)))
            .filter_map(|ep| {
                let ip = ep.address?.parse::<IpAddr>().ok()?;
                let p = port
                    .name
                    .as_ref()
                    .and_then(|n| ep.ports.get(n))
                    .and_then(|&p| u16::try_from(p).ok())
                    .unwrap_or(target);
                Some(SocketAddr::new(super::canonical_ip(ip), p))
            })
            .collect(),
        None => service
            .spec
            .addresses
            .iter()
            .filter_map(|a| a.parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(super::canonical_ip(ip), q))
            .collect(),
    };
    out.sort();
    out.dedup();
    out
}

/// The names the agent must resolve for routing: the hosts and SNI hosts of mesh routes.
pub fn routing_names(routing: &Routing<'_>) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for vs in routing.virtual_services {
        for route in routes_of(vs) {
            for m in &route.matches {
                names.extend(
                    m.hosts(vs)
                        .iter()
                        .filter(|h| !h.contains('*') && h.parse::<IpAddr>().is_err())
                        .cloned(),
                );
            }
        }
    }
    names
}

/// Redirects by address, for explaining a refusal: the routes of one scope that cover it.
pub fn route_for(
    redirects: &BTreeMap<RedirectKey, Arc<GatewayRoute>>,
    ip: IpAddr,
    port: u16,
) -> Option<&GatewayRoute> {
    let ip = super::canonical_ip(ip);
    redirects
        .get(&RedirectKey { port, ip })
        .or_else(|| redirects.get(&RedirectKey { port: 0, ip }))
        .map(|r| &**r)
}

#[cfg(test)]
#[path = "gateway_tests.rs"]
mod tests;
