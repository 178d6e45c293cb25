//! Findings about Gateway, VirtualService and DestinationRule: the `istioctl analyze` checks
//! that matter when traffic goes through an egress gateway (IST0101, IST0132), and what
//! redirecting whole connections in the kernel adds (design: shared/research/egress-gateway.md
//! §1.3, §1.6, §2.1). The field a finding is about starts its message, as in IST0106.

use super::{
    analyze::{finding, Finding, Subject},
    compile::visible_to,
    route_view::{
        entries_for, fqdn, gateway_behind, gateway_behind_if_mesh, gateway_id, gateway_named,
        is_service_of, routes_of, rule_for, Match, Route,
    },
};
use crate::{
    diag::Severity,
    istio::{
        routing::{host_matches, resolve_gateway_name, Destination, TrafficPolicy, MESH_GATEWAY},
        DestinationRule, Gateway, Resolution, ServiceEntry, VirtualService,
    },
};

/// Client TLS modes with which the client itself speaks TLS to the destination.
const ORIGINATING: [&str; 3] = ["SIMPLE", "MUTUAL", "ISTIO_MUTUAL"];

pub(super) fn analyze_routing(s: &Subject<'_>, out: &mut Vec<Finding>) {
    let mut found = Vec::new();
    for vs in s.virtual_services {
        let routes = routes_of(vs);
        missing_gateways(vs, &routes, s, &mut found);
        hosts_not_in_gateway(vs, s, &mut found);
        for route in &routes {
            missing_subsets(vs, route, s, &mut found);
            routes_to_gateway(vs, route, s, &mut found);
            routed_by_gateway(vs, route, s, &mut found);
        }
    }
    // Several routes can lead to one ServiceEntry or DestinationRule: report it once.
    for f in found {
        if !out.contains(&f) {
            out.push(f);
        }
    }
}

/// ENF0108 (IST0101 for gateways): a gateway that does not exist binds nothing.
fn missing_gateways(
    vs: &VirtualService,
    routes: &[Route<'_>],
    s: &Subject<'_>,
    out: &mut Vec<Finding>,
) {
    let top = vs
        .spec
        .gateways
        .iter()
        .enumerate()
        .map(|(i, g)| (format!("spec.gateways[{i}]"), g.as_str()));
    let in_matches = routes.iter().flat_map(Route::references);
    for (field, name) in top.chain(in_matches) {
        let resolved = resolve_gateway_name(name, &vs.namespace);
        if name == MESH_GATEWAY || gateway_named(s, &resolved).is_some() {
            continue;
        }
        out.push(finding(
            "ENF0108",
            Severity::Error,
            "VirtualService",
            vs,
            format!("{field}: Gateway {resolved} does not exist, so the routes bound to it apply nowhere (as IST0101)"),
            "create the Gateway, or name an existing one as <namespace>/<name>",
        ));
    }
}

/// ENF0109 (IST0132): a Gateway none of whose server hosts matches a host of the
/// VirtualService does not take its traffic.
fn hosts_not_in_gateway(vs: &VirtualService, s: &Subject<'_>, out: &mut Vec<Finding>) {
    for (i, name) in vs.spec.gateways.iter().enumerate() {
        let Some(g) = gateway_named(s, &resolve_gateway_name(name, &vs.namespace)) else {
            continue;
        };
        let mut server_hosts = g.spec.servers.iter().flat_map(|sv| &sv.hosts);
        let bound = server_hosts.any(|h| {
            server_host_for(h, &g.namespace, &vs.namespace)
                .is_some_and(|gh| vs.spec.hosts.iter().any(|vh| host_matches(gh, vh)))
        });
        if !bound {
            out.push(finding(
                "ENF0109",
                Severity::Warning,
                "VirtualService",
                vs,
                format!(
                    "spec.gateways[{i}]: no server host of Gateway {} matches the hosts [{}] for namespace {}, so the gateway does not route them (as IST0132)",
                    gateway_id(g),
                    vs.spec.hosts.join(", "),
                    vs.namespace
                ),
                "add the host to a server of the Gateway (as host or <namespace>/host), or fix spec.hosts",
            ));
        }
    }
}

/// A server host's name as a VirtualService in `vs_ns` sees it, if its namespace part (`.` the
/// Gateway's, `*` any) lets that namespace bind it.
fn server_host_for<'h>(host: &'h str, gw_ns: &str, vs_ns: &str) -> Option<&'h str> {
    match host.split_once('/') {
        None => Some(host),
        Some(("*", name)) => Some(name),
        Some((".", name)) if gw_ns == vs_ns => Some(name),
        Some((ns, name)) if ns == vs_ns => Some(name),
        Some(_) => None,
    }
}

/// ENF0110 (IST0101 for subsets): a subset no DestinationRule defines has no endpoints.
fn missing_subsets(
    vs: &VirtualService,
    route: &Route<'_>,
    s: &Subject<'_>,
    out: &mut Vec<Finding>,
) {
    for (field, dest) in &route.destinations {
        let Some(subset) = dest.subset.as_deref().filter(|x| !x.is_empty()) else {
            continue;
        };
        let host = fqdn(&dest.host, &vs.namespace);
        // The clients the VirtualService's author routes are its namespace's: the rule they
        // use, not any rule, must define the subset (the compiler refuses otherwise).
        let rule = rule_for(&host, &vs.namespace, s);
        if rule.is_some_and(|dr| dr.spec.subsets.iter().any(|x| x.name == subset)) {
            continue;
        }
        out.push(finding(
            "ENF0110",
            Severity::Error,
            "VirtualService",
            vs,
            format!("{field}.subset: no DestinationRule for {host} defines subset {subset}, so this route has no endpoints (Istio answers 503; as IST0101)"),
            format!("define subset {subset} in a DestinationRule for {host}, or remove it from the destination"),
        ));
    }
}

/// ENF0107, ENF0112 and ENF0114: a route whose destination is an egress gateway's service.
fn routes_to_gateway(
    vs: &VirtualService,
    route: &Route<'_>,
    s: &Subject<'_>,
    out: &mut Vec<Finding>,
) {
    if !route.applies_to_mesh() {
        for (field, dest) in &route.destinations {
            if let Some(g) = bypassed(vs, route, dest, s) {
                bypass(vs, route, field, g, out);
            }
        }
        return;
    }
    let mut to_mesh = false;
    for m in &route.matches {
        for (field, dest) in &route.destinations {
            if let Some(g) = gateway_behind(vs, m, dest, s.gateways) {
                to_mesh = true;
                client_tls(vs, m, field, dest, g, s, out);
            }
        }
    }
    if let Some(m) = route.l7_match().filter(|_| to_mesh) {
        let (field, predicates) = (&m.field, &m.l7);
        out.push(finding(
            "ENF0114",
            Severity::Warning,
            "VirtualService",
            vs,
            format!(
                "{field}: {} {} per request, but enforcer sends whole connections to the gateway: every request on a connection to [{}] matching the ports goes through it, or none does",
                predicates.join(", "),
                if predicates.len() == 1 { "decides" } else { "decide" },
                vs.spec.hosts.join(", ")
            ),
            "route all of a host and port through the gateway (match gateways and port only), and split requests there",
        ));
    }
}

/// The Gateway a route that does not apply to the mesh would send the mesh's connections to
/// through `dest`, were it bound to the mesh, when `dest` is recognisably that Gateway's service.
fn bypassed<'a>(
    vs: &VirtualService,
    route: &Route<'_>,
    dest: &Destination,
    s: &Subject<'a>,
) -> Option<&'a Gateway> {
    let host = fqdn(&dest.host, &vs.namespace);
    route
        .matches
        .iter()
        .find_map(|m| gateway_behind_if_mesh(vs, m, dest, s.gateways))
        .filter(|g| is_service_of(g, &host, s))
}

/// ENF0107: the seed's warning. Without `mesh`, no workload's traffic follows this route.
fn bypass(
    vs: &VirtualService,
    route: &Route<'_>,
    field: &str,
    g: &Gateway,
    out: &mut Vec<Finding>,
) {
    let whole = vs.spec.effective_gateways().contains(&MESH_GATEWAY);
    let place = if whole {
        format!("{}.match gateways", route.field)
    } else {
        "spec.gateways".to_string()
    };
    out.push(finding(
        "ENF0107",
        Severity::Warning,
        "VirtualService",
        vs,
        format!(
            "{field}: routes to the service of egress Gateway {}, but mesh is not in {place}, so workloads' connections to [{}] are not sent to the gateway: they bypass it",
            gateway_id(g),
            vs.spec.hosts.join(", ")
        ),
        format!("add mesh to {place}, beside the gateway"),
    ));
}

/// ENF0112: the kernel redirects connections but cannot speak TLS in them.
fn client_tls(
    vs: &VirtualService,
    m: &Match<'_>,
    field: &str,
    dest: &Destination,
    g: &Gateway,
    s: &Subject<'_>,
    out: &mut Vec<Finding>,
) {
    let host = fqdn(&dest.host, &vs.namespace);
    // The port the compiler redirects to: the destination's, else the match's.
    let port = dest.port.map(|p| p.number).or(m.port);
    // The rule the compiler applies: that of the match's clients.
    let client_ns = m.source_namespace.unwrap_or(&vs.namespace);
    let Some(dr) = rule_for(&host, client_ns, s) else {
        return;
    };
    if let Some((tls_field, mode)) = originated_tls(dr, dest.subset.as_deref(), port) {
        out.push(finding(
            "ENF0112",
            Severity::Error,
            "DestinationRule",
            dr,
            format!(
                "{tls_field}: {mode} makes the client originate TLS to {host}, the service of egress Gateway {}, where VirtualService {} ({field}) sends the mesh's traffic; the kernel cannot originate TLS, so enforcer refuses these connections",
                gateway_id(g),
                vs.id()
            ),
            "send plain text to the gateway (tls mode DISABLE, a plain HTTP or TLS PASSTHROUGH server) and originate TLS at the gateway",
        ));
    }
}

/// The client TLS mode for `subset` on `port` (any port when `None`), if it
/// originates TLS, with its field. Istio's `MergeTrafficPolicy` order: the subset's port
/// setting, the subset's, the rule's port setting, the rule's.
fn originated_tls(
    dr: &DestinationRule,
    subset: Option<&str>,
    port: Option<u32>,
) -> Option<(String, String)> {
    let mut policies: Vec<(String, &TrafficPolicy)> = Vec::new();
    let found = subset.and_then(|n| {
        dr.spec
            .subsets
            .iter()
            .enumerate()
            .find(|(_, x)| x.name == n)
    });
    if let Some((i, Some(policy))) = found.map(|(i, x)| (i, x.traffic_policy.as_ref())) {
        policies.push((format!("spec.subsets[{i}].trafficPolicy"), policy));
    }
    if let Some(policy) = &dr.spec.traffic_policy {
        policies.push(("spec.trafficPolicy".to_string(), policy));
    }
    tls_setting(&policies, port)
}

/// For a known port the first setting decides; for any port, every setting counts.
fn tls_setting(
    policies: &[(String, &TrafficPolicy)],
    port: Option<u32>,
) -> Option<(String, String)> {
    let mut settings = Vec::new();
    for (field, policy) in policies {
        for (i, pls) in policy.port_level_settings.iter().enumerate() {
            let applies = port.is_none_or(|n| pls.port.is_some_and(|p| p.number == n));
            if let Some(mode) = pls
                .tls
                .as_ref()
                .and_then(|t| t.mode.as_deref())
                .filter(|_| applies)
            {
                settings.push((format!("{field}.portLevelSettings[{i}].tls.mode"), mode));
            }
        }
        if let Some(mode) = policy.tls.as_ref().and_then(|t| t.mode.as_deref()) {
            settings.push((format!("{field}.tls.mode"), mode));
        }
    }
    let considered = if port.is_some() {
        settings.len().min(1)
    } else {
        settings.len()
    };
    settings
        .into_iter()
        .take(considered)
        .find(|(_, mode)| ORIGINATING.contains(mode))
        .map(|(field, mode)| (field, mode.to_string()))
}

/// ENF0111 and ENF0113: what a gateway needs of the hosts it forwards to.
fn routed_by_gateway(
    vs: &VirtualService,
    route: &Route<'_>,
    s: &Subject<'_>,
    out: &mut Vec<Finding>,
) {
    let gateways = route
        .gateways()
        .into_iter()
        .filter_map(|n| gateway_named(s, n));
    for g in gateways {
        for (field, dest) in &route.destinations {
            // The way into a gateway, from the mesh or bypassed (ENF0107), is not a host the
            // gateway forwards to.
            let to_gateway = route
                .matches
                .iter()
                .any(|m| gateway_behind(vs, m, dest, s.gateways).is_some());
            if to_gateway || bypassed(vs, route, dest, s).is_some() {
                continue;
            }
            let host = fqdn(&dest.host, &vs.namespace);
            let entries = entries_for(&host, s);
            let seen = |se: &&ServiceEntry| {
                visible_to(se, s.mesh).is_none_or(|v| v.contains(&g.namespace))
            };
            if !entries.iter().any(seen) {
                for se in &entries {
                    not_exported(vs, field, &host, g, se, s, out);
                }
            }
            // Only what the gateway's namespace sees is what it connects by.
            for se in entries
                .iter()
                .filter(|se| seen(se) && se.spec.resolution == Resolution::None)
            {
                out.push(finding(
                    "ENF0113",
                    Severity::Warning,
                    "ServiceEntry",
                    se,
                    format!(
                        "spec.resolution: NONE for {host}, which Gateway {} forwards to (VirtualService {} {field}): the gateway connects to the address it was sent to, itself, and loops",
                        gateway_id(g),
                        vs.id()
                    ),
                    "use resolution DNS (or STATIC with endpoints) for hosts reached through a gateway",
                ));
            }
        }
    }
}

/// ENF0111: the gateway's workloads see only the entries exported to their namespace (Istio
/// answers 503 there; enforcer refuses the gateway's connection).
fn not_exported(
    vs: &VirtualService,
    field: &str,
    host: &str,
    g: &Gateway,
    se: &ServiceEntry,
    s: &Subject<'_>,
    out: &mut Vec<Finding>,
) {
    let list = s.mesh.export_to(se).join(", ");
    out.push(finding(
        "ENF0111",
        Severity::Warning,
        "ServiceEntry",
        se,
        format!(
            "spec.exportTo: [{list}] does not include {}, the namespace of Gateway {}, which forwards to {host} (VirtualService {} {field}): the gateway cannot reach {host} (Istio's answers 503, enforcer refuses its workloads' connections)",
            g.namespace,
            gateway_id(g),
            vs.id()
        ),
        format!("add \"{}\" to spec.exportTo (enforcer's default is \".\", Istio's \"*\")", g.namespace),
    ));
}

#[cfg(test)]
#[path = "analyze_routing_tests.rs"]
mod tests;
