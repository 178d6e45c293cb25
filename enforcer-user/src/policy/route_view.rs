//! A VirtualService's routes as both the compiler (`gateway.rs`) and the analyzer
//! (`analyze_routing.rs`) read them, and the two rules they share: which Gateway is behind a
//! mesh destination, and which DestinationRule a client uses. One view, so that what the
//! analyzer reports is what the compiler enforces.

use std::{cmp::Reverse, collections::BTreeSet};

use super::{analyze::Subject, model::Labels, sidecar::selects};
use crate::istio::{
    routing::{
        host_matches, host_subset_of, resolve_gateway_name, Destination, HttpMatch, L4Match,
        RouteDestination, TlsMatch, MESH_GATEWAY,
    },
    DestinationRule, Gateway, ServiceEntry, VirtualService,
};

/// HTTP match fields decided per request.
const L7_PREDICATES: [&str; 7] = [
    "uri",
    "scheme",
    "method",
    "authority",
    "headers",
    "queryParams",
    "withoutHeaders",
];

const NO_LABELS: &Labels = &Labels::new();

/// One route of a VirtualService, HTTP, TLS or TCP.
pub(super) struct Route<'a> {
    /// `spec.http[0]`.
    pub(super) field: String,
    /// Never empty: a route without matches has one that takes everything.
    pub(super) matches: Vec<Match<'a>>,
    /// `spec.http[0].route[1].destination`, for the entries that have one.
    pub(super) destinations: Vec<(String, &'a Destination)>,
}

/// One match of a route, with where it applies.
pub(super) struct Match<'a> {
    /// `spec.http[0].match[1]`, or the route's field for the implicit match of a route
    /// without matches.
    pub(super) field: String,
    /// `mesh` and `namespace/name` of the gateways it applies to.
    pub(super) gateways: BTreeSet<String>,
    /// `None` takes any port (0 is unset, as in the proto).
    pub(super) port: Option<u32>,
    /// A TLS match's SNI names: the names whose connections it takes, instead of the
    /// VirtualService's hosts.
    pub(super) sni_hosts: &'a [String],
    pub(super) source_labels: &'a Labels,
    pub(super) source_namespace: Option<&'a str>,
    /// The HTTP predicates decided per request (`uri`, `headers`...).
    pub(super) l7: Vec<String>,
    /// The gateway names written in the match, with their fields.
    pub(super) references: Vec<(String, &'a str)>,
}

/// A match as written, before its gateways are resolved.
struct Written<'a> {
    gateways: &'a [String],
    port: Option<u32>,
    sni_hosts: &'a [String],
    source_labels: &'a Labels,
    source_namespace: Option<&'a str>,
    l7: Vec<String>,
}

fn http_match(m: &HttpMatch) -> Written<'_> {
    Written {
        gateways: &m.gateways,
        port: m.port,
        sni_hosts: &[],
        source_labels: &m.source_labels,
        source_namespace: m.source_namespace.as_deref(),
        l7: m
            .l7
            .keys()
            .filter(|k| L7_PREDICATES.contains(&k.as_str()))
            .cloned()
            .collect(),
    }
}

fn tls_match(m: &TlsMatch) -> Written<'_> {
    Written {
        sni_hosts: &m.sni_hosts,
        ..l4_match(&m.l4)
    }
}

fn l4_match(m: &L4Match) -> Written<'_> {
    Written {
        gateways: &m.gateways,
        port: m.port,
        sni_hosts: &[],
        source_labels: &m.source_labels,
        source_namespace: m.source_namespace.as_deref(),
        l7: Vec::new(),
    }
}

/// Every route of a VirtualService, HTTP, then TLS, then TCP.
pub(super) fn routes_of(vs: &VirtualService) -> Vec<Route<'_>> {
    let spec = &vs.spec;
    let mut out = Vec::new();
    for (i, r) in spec.http.iter().enumerate() {
        let matches = r.matches.iter().map(http_match).collect();
        out.push(route(vs, format!("spec.http[{i}]"), matches, &r.route));
    }
    for (i, r) in spec.tls.iter().enumerate() {
        let matches = r.matches.iter().map(tls_match).collect();
        out.push(route(vs, format!("spec.tls[{i}]"), matches, &r.route));
    }
    for (i, r) in spec.tcp.iter().enumerate() {
        let matches = r.matches.iter().map(l4_match).collect();
        out.push(route(vs, format!("spec.tcp[{i}]"), matches, &r.route));
    }
    out
}

fn route<'a>(
    vs: &'a VirtualService,
    field: String,
    written: Vec<Written<'a>>,
    destinations: &'a [RouteDestination],
) -> Route<'a> {
    let top: BTreeSet<String> = vs
        .spec
        .effective_gateways()
        .into_iter()
        .map(|g| resolve_gateway_name(g, &vs.namespace))
        .collect();
    let matches = if written.is_empty() {
        // A route without matches takes everything its VirtualService is bound to.
        let all = Written {
            gateways: &[],
            port: None,
            sni_hosts: &[],
            source_labels: NO_LABELS,
            source_namespace: None,
            l7: Vec::new(),
        };
        vec![bind(field.clone(), all, &top, &vs.namespace)]
    } else {
        let each = written.into_iter().enumerate();
        each.map(|(j, m)| bind(format!("{field}.match[{j}]"), m, &top, &vs.namespace))
            .collect()
    };
    let destinations = destinations
        .iter()
        .enumerate()
        .filter_map(|(k, d)| {
            let f = format!("{field}.route[{k}].destination");
            d.destination.as_ref().map(|dest| (f, dest))
        })
        .collect();
    Route {
        field,
        matches,
        destinations,
    }
}

/// Istio indexes a VirtualService under its top-level gateways only, so a match's `gateways`
/// can narrow them but never add one.
fn bind<'a>(field: String, m: Written<'a>, top: &BTreeSet<String>, namespace: &str) -> Match<'a> {
    let gateways = if m.gateways.is_empty() {
        top.clone()
    } else {
        m.gateways
            .iter()
            .map(|g| resolve_gateway_name(g, namespace))
            .filter(|g| top.contains(g))
            .collect()
    };
    let references = m
        .gateways
        .iter()
        .enumerate()
        .map(|(k, g)| (format!("{field}.gateways[{k}]"), g.as_str()))
        .collect();
    Match {
        field,
        gateways,
        port: m.port.filter(|p| *p > 0),
        sni_hosts: m.sni_hosts,
        source_labels: m.source_labels,
        source_namespace: m.source_namespace,
        l7: m.l7,
        references,
    }
}

impl<'a> Route<'a> {
    /// The gateways any of its matches applies to.
    pub(super) fn gateways(&self) -> BTreeSet<&str> {
        let all = self.matches.iter().flat_map(|m| &m.gateways);
        all.map(String::as_str).collect()
    }

    pub(super) fn applies_to_mesh(&self) -> bool {
        self.matches.iter().any(Match::applies_to_mesh)
    }

    /// The first match for the mesh that decides per request.
    pub(super) fn l7_match(&self) -> Option<&Match<'a>> {
        let mut mesh = self.matches.iter().filter(|m| m.applies_to_mesh());
        mesh.find(|m| !m.l7.is_empty())
    }

    /// The gateway names written in its matches, with their fields.
    pub(super) fn references(&self) -> impl Iterator<Item = (String, &'a str)> + '_ {
        self.matches
            .iter()
            .flat_map(|m| m.references.iter().cloned())
    }
}

impl<'a> Match<'a> {
    pub(super) fn applies_to_mesh(&self) -> bool {
        self.gateways.contains(MESH_GATEWAY)
    }

    /// The names whose connections the match takes: its SNI hosts, else the VirtualService's.
    pub(super) fn hosts(&self, vs: &'a VirtualService) -> &'a [String] {
        if self.sni_hosts.is_empty() {
            &vs.spec.hosts
        } else {
            self.sni_hosts
        }
    }
}

/// The Gateway whose workloads take a mesh match's connections to `dest`: what the compiler
/// redirects, and so what the analyzer reports on. No object says which Service is a Gateway's,
/// so the VirtualService's shape decides: bound to the mesh and to an existing Gateway (the
/// first of its `spec.gateways`), its mesh match sends the names it takes to another host,
/// which can only be the way into that Gateway.
pub(super) fn gateway_behind<'g>(
    vs: &VirtualService,
    m: &Match<'_>,
    dest: &Destination,
    gateways: &'g [Gateway],
) -> Option<&'g Gateway> {
    if !m.applies_to_mesh() {
        return None;
    }
    gateway_behind_if_mesh(vs, m, dest, gateways)
}

/// [`gateway_behind`], as if `m` applied to the mesh: for a route that sends the mesh nowhere.
pub(super) fn gateway_behind_if_mesh<'g>(
    vs: &VirtualService,
    m: &Match<'_>,
    dest: &Destination,
    gateways: &'g [Gateway],
) -> Option<&'g Gateway> {
    // A destination among the names the match takes is a plain mesh route (an ingress
    // VirtualService also bound to `mesh`, a port left direct): redirecting it to itself
    // would refuse traffic Istio lets through.
    let host = fqdn(&dest.host, &vs.namespace);
    let own = m.hosts(vs).iter();
    if own
        .map(|h| fqdn(h, &vs.namespace))
        .any(|h| host_matches(&h, &host))
    {
        return None;
    }
    vs.spec
        .gateways
        .iter()
        .map(|g| resolve_gateway_name(g, &vs.namespace))
        .find_map(|id| gateways.iter().find(|g| g.id() == id))
}

/// The DestinationRule a client in `client_ns` uses for `host` (a FQDN), as Istio looks it up:
/// the rules of the client's namespace, then those of the service's namespace, then those of
/// the root namespace, the latter two only when exported to the client. In a namespace, a rule
/// for `host` itself (a short name is a Service of the rule's namespace), else the most
/// specific wildcard covering it; the oldest on a tie. Istio merges rules of one host in one
/// namespace; here the oldest wins whole.
pub(super) fn destination_rule<'a>(
    rules: &'a [DestinationRule],
    host: &str,
    client_ns: &str,
    service_ns: Option<&str>,
    root_ns: &str,
) -> Option<&'a DestinationRule> {
    let exported = |dr: &DestinationRule| {
        dr.namespace == client_ns
            || dr
                .spec
                .export_to
                .as_ref()
                .is_none_or(|list| list.iter().any(|e| e == "*" || e == client_ns))
    };
    [Some(client_ns), service_ns, Some(root_ns)]
        .into_iter()
        .flatten()
        .find_map(|ns| {
            rules
                .iter()
                .filter(|dr| dr.namespace == ns && exported(dr))
                .filter_map(|dr| {
                    let name = fqdn(&dr.spec.host, &dr.namespace);
                    host_subset_of(host, &name).then_some((dr, name))
                })
                .min_by_key(|(dr, name)| (name.starts_with('*'), Reverse(name.len()), dr.age_key()))
                .map(|(dr, _)| dr)
        })
}

/// The DestinationRule clients in `client_ns` use for `host`, the service's namespace taken
/// from the entry that declares it, else from a Kubernetes name (`name.namespace.svc...`).
pub(super) fn rule_for<'a>(
    host: &str,
    client_ns: &str,
    s: &Subject<'a>,
) -> Option<&'a DestinationRule> {
    let declared = entries_for(host, s).first().map(|se| se.namespace.clone());
    let service_ns = declared.or_else(|| {
        let mut labels = host.split('.');
        match (labels.next(), labels.next(), labels.next()) {
            (Some(_), Some(ns), Some("svc")) => Some(ns.to_string()),
            _ => None,
        }
    });
    destination_rule(
        s.destination_rules,
        host,
        client_ns,
        service_ns.as_deref(),
        s.root_namespace,
    )
}

/// Istio's `ConvertHostToFQDN`: a short name is a Service of the referring namespace.
pub(super) fn fqdn(host: &str, namespace: &str) -> String {
    if host.starts_with('*') || host.contains('.') {
        host.to_string()
    } else {
        format!("{host}.{namespace}.svc.cluster.local")
    }
}

pub(super) fn gateway_named<'a>(s: &Subject<'a>, name: &str) -> Option<&'a Gateway> {
    s.gateways
        .iter()
        .find(|g| name.split_once('/') == Some((g.namespace.as_str(), g.name.as_str())))
}

pub(super) fn entries_for<'a>(host: &str, s: &Subject<'a>) -> Vec<&'a ServiceEntry> {
    s.entries
        .iter()
        .filter(|se| se.spec.hosts.iter().any(|h| host_subset_of(host, h)))
        .collect()
}

/// Whether `host` (a FQDN) is recognisably the service of `g`'s workloads: a Service named like
/// the Gateway (in its namespace) or like its selector (the chart's `istio-egressgateway` for
/// `istio: egressgateway`), or an entry whose endpoints carry the selector's labels. Only for
/// a route that does not apply to the mesh: nothing is redirected there, and a gateway's own
/// routes may forward to hosts other than the VirtualService's (an upstream proxy), so the
/// route's shape alone does not tell a bypass.
pub(super) fn is_service_of(g: &Gateway, host: &str, s: &Subject<'_>) -> bool {
    let mut labels = host.split('.');
    let named = match (labels.next(), labels.next(), labels.next()) {
        (Some(svc), Some(ns), Some("svc")) => {
            (ns == g.namespace && svc == g.name)
                || g.spec
                    .selector
                    .values()
                    .any(|v| svc == v || svc.strip_prefix("istio-") == Some(v))
        }
        _ => false,
    };
    let sel = &g.spec.selector;
    named
        || !sel.is_empty()
            && entries_for(host, s).iter().any(|se| {
                se.spec.endpoints.iter().any(|e| selects(sel, &e.labels))
                    || se
                        .spec
                        .workload_selector
                        .as_ref()
                        .is_some_and(|w| selects(sel, &w.labels))
            })
}

pub(super) fn gateway_id(g: &Gateway) -> String {
    format!("{}/{}", g.namespace, g.name)
}
