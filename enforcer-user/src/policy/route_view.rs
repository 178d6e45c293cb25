//! A VirtualService's routes as the analyzer sees them: where each applies (Istio's gateway
//! and match semantics), and which destination is an egress gateway's service.

use std::collections::BTreeSet;

use super::{analyze::Subject, sidecar::selects};
use crate::istio::{
    routing::{
        host_matches, host_subset_of, resolve_gateway_name, Destination, HttpMatch,
        RouteDestination, MESH_GATEWAY,
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

/// One route of a VirtualService, HTTP, TLS or TCP, with where it applies.
pub(super) struct Route<'a> {
    /// `spec.http[0]`.
    pub(super) field: String,
    /// `mesh` and `namespace/name` of the gateways it applies to.
    pub(super) gateways: BTreeSet<String>,
    /// The ports its matches name; `None` when one of them (or no match) takes any port.
    pub(super) ports: Option<BTreeSet<u32>>,
    /// The first match for the mesh that decides per request, with its predicates.
    pub(super) l7_match: Option<(String, Vec<String>)>,
    /// The gateway names written in its matches, with their fields.
    pub(super) references: Vec<(String, &'a str)>,
    pub(super) destinations: Vec<(String, &'a Destination)>,
}

/// A match, whatever the route's kind.
struct Match<'a> {
    gateways: &'a [String],
    port: Option<u32>,
    l7: Vec<String>,
}

pub(super) fn routes_of(vs: &VirtualService) -> Vec<Route<'_>> {
    let spec = &vs.spec;
    let l7 = |m: &HttpMatch| {
        m.l7.keys()
            .filter(|k| L7_PREDICATES.contains(&k.as_str()))
            .cloned()
            .collect()
    };
    let mut out = Vec::new();
    for (i, r) in spec.http.iter().enumerate() {
        let matches = r.matches.iter().map(|m| Match {
            gateways: &m.gateways,
            port: m.port,
            l7: l7(m),
        });
        out.push(route(vs, format!("spec.http[{i}]"), matches, &r.route));
    }
    for (i, r) in spec.tls.iter().enumerate() {
        let matches = r.matches.iter().map(|m| Match {
            gateways: &m.gateways,
            port: m.port,
            l7: Vec::new(),
        });
        out.push(route(vs, format!("spec.tls[{i}]"), matches, &r.route));
    }
    for (i, r) in spec.tcp.iter().enumerate() {
        let matches = r.matches.iter().map(|m| Match {
            gateways: &m.gateways,
            port: m.port,
            l7: Vec::new(),
        });
        out.push(route(vs, format!("spec.tcp[{i}]"), matches, &r.route));
    }
    out
}

fn route<'a>(
    vs: &'a VirtualService,
    field: String,
    matches: impl Iterator<Item = Match<'a>>,
    destinations: &'a [RouteDestination],
) -> Route<'a> {
    let top: BTreeSet<String> = vs
        .spec
        .effective_gateways()
        .into_iter()
        .map(|g| resolve_gateway_name(g, &vs.namespace))
        .collect();
    let destinations = destinations
        .iter()
        .enumerate()
        .filter_map(|(k, d)| {
            let f = format!("{field}.route[{k}].destination");
            d.destination.as_ref().map(|dest| (f, dest))
        })
        .collect();
    let mut r = Route {
        field,
        gateways: BTreeSet::new(),
        ports: Some(BTreeSet::new()),
        l7_match: None,
        references: Vec::new(),
        destinations,
    };
    let mut any = false;
    for (j, m) in matches.enumerate() {
        any = true;
        r.add_match(j, m, &top, &vs.namespace);
    }
    // A route without matches takes everything its VirtualService is bound to.
    if !any {
        r.gateways = top;
        r.ports = None;
    }
    r
}

impl<'a> Route<'a> {
    /// Istio indexes a VirtualService under its top-level gateways only, so a match's
    /// `gateways` can narrow them but never add one.
    fn add_match(&mut self, j: usize, m: Match<'a>, top: &BTreeSet<String>, namespace: &str) {
        let applies: BTreeSet<String> = if m.gateways.is_empty() {
            top.clone()
        } else {
            m.gateways
                .iter()
                .map(|g| resolve_gateway_name(g, namespace))
                .filter(|g| top.contains(g))
                .collect()
        };
        if applies.contains(MESH_GATEWAY) && !m.l7.is_empty() && self.l7_match.is_none() {
            self.l7_match = Some((format!("{}.match[{j}]", self.field), m.l7));
        }
        self.gateways.extend(applies);
        match (m.port.filter(|p| *p > 0), &mut self.ports) {
            (Some(p), Some(ports)) => {
                ports.insert(p);
            }
            (None, _) => self.ports = None,
            _ => {}
        }
        for (k, g) in m.gateways.iter().enumerate() {
            let f = format!("{}.match[{j}].gateways[{k}]", self.field);
            self.references.push((f, g.as_str()));
        }
    }
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

pub(super) fn rules_for<'a>(
    host: &str,
    s: &Subject<'a>,
) -> impl Iterator<Item = &'a DestinationRule> {
    let host = host.to_string();
    s.destination_rules
        .iter()
        .filter(move |dr| host_subset_of(&host, &fqdn(&dr.spec.host, &dr.namespace)))
}

pub(super) fn entries_for<'a>(host: &str, s: &Subject<'a>) -> Vec<&'a ServiceEntry> {
    s.entries
        .iter()
        .filter(|se| se.spec.hosts.iter().any(|h| host_subset_of(host, h)))
        .collect()
}

/// The Gateway whose workloads are behind `dest`, which no object says outright. Taken as
/// such: a Service named like the Gateway (in its namespace) or like its selector (the
/// chart's `istio-egressgateway` for `istio: egressgateway`); a ServiceEntry whose endpoints
/// carry the selector's labels; or, as in the seed, a subset of a host with a
/// DestinationRule that is not one of the VirtualService's hosts, in a VirtualService bound
/// to an existing Gateway.
pub(super) fn gateway_behind<'a>(
    dest: &Destination,
    vs: &VirtualService,
    s: &Subject<'a>,
) -> Option<&'a Gateway> {
    let host = fqdn(&dest.host, &vs.namespace);
    let named = |g: &&Gateway| {
        let mut labels = host.split('.');
        let (Some(svc), Some(ns), Some("svc")) = (labels.next(), labels.next(), labels.next())
        else {
            return false;
        };
        (ns == g.namespace && svc == g.name)
            || g.spec
                .selector
                .values()
                .any(|v| svc == v || svc.strip_prefix("istio-") == Some(v))
    };
    let selected = |g: &&Gateway| {
        !g.spec.selector.is_empty()
            && entries_for(&host, s).iter().any(|se| {
                let sel = &g.spec.selector;
                se.spec.endpoints.iter().any(|e| selects(sel, &e.labels))
                    || se
                        .spec
                        .workload_selector
                        .as_ref()
                        .is_some_and(|w| selects(sel, &w.labels))
            })
    };
    s.gateways
        .iter()
        .find(|g| named(g) || selected(g))
        .or_else(|| subset_through_gateway(dest, &host, vs, s))
}

fn subset_through_gateway<'a>(
    dest: &Destination,
    host: &str,
    vs: &VirtualService,
    s: &Subject<'a>,
) -> Option<&'a Gateway> {
    dest.subset.as_ref()?;
    let own = vs
        .spec
        .hosts
        .iter()
        .any(|h| host_matches(&fqdn(h, &vs.namespace), host));
    if own || rules_for(host, s).next().is_none() {
        return None;
    }
    vs.spec
        .gateways
        .iter()
        .filter(|g| *g != MESH_GATEWAY)
        .find_map(|g| gateway_named(s, &resolve_gateway_name(g, &vs.namespace)))
}

pub(super) fn gateway_id(g: &Gateway) -> String {
    format!("{}/{}", g.namespace, g.name)
}
