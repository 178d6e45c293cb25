//! The routes of a VirtualService, as Istio's `validateHTTPRoute`, `validateTLSRoute`,
//! `validateTCPRoute`, `validateRouteDestinations` and `validateGatewayNames` check them, for
//! the typed fields. Regexes and header manipulations are not checked.

use std::net::IpAddr;

use serde_yaml::Value;

use super::{
    validate::{check_host, is_dns1123_label, Errors},
    validate_routing::{check_subset_name, wildcard_domain},
    validate_workload::check_labels,
};
use crate::{
    istio::routing::{
        host_subset_of, Destination, HttpMatch, HttpRoute, L4Match, Other, RouteDestination,
        TcpRoute, TlsMatch, TlsRoute, VirtualServiceSpec,
    },
    net::parse_ip_or_cidr,
};

/// HTTPRoute fields Istio has and enforcer does not type: valid, but not enforced.
const UNTYPED_ROUTE_FIELDS: [&str; 10] = [
    "rewrite",
    "timeout",
    "retries",
    "fault",
    "mirror",
    "mirrors",
    "mirrorPercent",
    "mirrorPercentage",
    "corsPolicy",
    "headers",
];

/// HTTPMatchRequest fields Istio has and enforcer does not type: the per-request predicates.
const UNTYPED_MATCH_FIELDS: [&str; 9] = [
    "uri",
    "scheme",
    "method",
    "authority",
    "headers",
    "queryParams",
    "ignoreUriCase",
    "withoutHeaders",
    "statPrefix",
];

/// Istio's `validateHTTPRoute`; `delegate` when the VirtualService is itself a delegate.
pub(super) fn check_http_route(route: &HttpRoute, delegate: bool, field: &str, errs: &mut Errors) {
    check_http_conflicts(route, delegate, field, errs);
    for (m, matched) in route.matches.iter().enumerate() {
        check_http_match(matched, &format!("{field}.match[{m}]"), errs);
    }
    check_redirect_and_response(route, field, errs);
    check_route_destinations(&route.route, field, errs);
    warn_unknown(
        &route.other,
        &UNTYPED_ROUTE_FIELDS,
        field,
        "an HTTP route",
        errs,
    );
}

/// Istio's `validateHTTPRouteConflict`: a route forwards, redirects, answers, or (in a root)
/// delegates, and only one of those.
fn check_http_conflicts(route: &HttpRoute, delegate: bool, field: &str, errs: &mut Errors) {
    let name = route
        .name
        .as_deref()
        .map_or(String::new(), |n| format!(" {n}"));
    if route.delegate.is_some() && !delegate {
        if route.redirect.is_some() {
            errs.push(
                format!("{field}.redirect"),
                format!("root HTTP route{name} must not specify redirect"),
            );
        }
        if !route.route.is_empty() {
            errs.push(
                format!("{field}.route"),
                format!("root HTTP route{name} must not specify route"),
            );
        }
        return;
    }
    if route.delegate.is_some() {
        errs.push(
            format!("{field}.delegate"),
            "delegate HTTP route cannot contain delegate",
        );
    }
    let has = |key: &str| route.other.contains_key(key);
    let kind = if route.redirect.is_some() {
        Some("redirect")
    } else if route.direct_response.is_some() {
        Some("direct_response")
    } else {
        None
    };
    match kind {
        None if route.route.is_empty() => errs.push(
            format!("{field}.route"),
            "HTTP route, redirect or direct_response is required",
        ),
        None => {}
        Some(kind) => {
            let others = [
                ("route", !route.route.is_empty()),
                ("fault", has("fault")),
                ("rewrite", has("rewrite")),
                (
                    "direct_response",
                    kind == "redirect" && route.direct_response.is_some(),
                ),
            ];
            for (other, _) in others.iter().filter(|(_, present)| *present) {
                errs.push(
                    field,
                    format!("HTTP route cannot contain both {other} and {kind}"),
                );
            }
        }
    }
    if has("mirror") && has("mirrors") {
        errs.push(field, "HTTP route cannot contain both mirror and mirrors");
    }
}

/// Istio's `validateHTTPRedirect` and `validateHTTPDirectResponse`, for what they must name.
fn check_redirect_and_response(route: &HttpRoute, field: &str, errs: &mut Errors) {
    if let Some(redirect) = &route.redirect {
        let targets = ["uri", "authority", "port", "derivePort", "scheme"];
        if !targets.iter().any(|k| redirect.get(k).is_some()) {
            errs.push(
                format!("{field}.redirect"),
                "redirect must specify URI, authority, scheme, or port",
            );
        }
    }
    if let Some(response) = &route.direct_response {
        let status = response.get("status").and_then(Value::as_i64).unwrap_or(0);
        // Istio's bound is 600 inclusive, though its message says 599.
        if !(200..=600).contains(&status) {
            errs.push(
                format!("{field}.directResponse.status"),
                format!("HTTP status {status} is not in range 200-599"),
            );
        }
    }
}

/// Istio's `validateHTTPRouteMatchRequest`, without the regex checks.
fn check_http_match(matched: &HttpMatch, field: &str, errs: &mut Errors) {
    check_match_port(matched.port, field, errs);
    check_labels(
        &matched.source_labels,
        &format!("{field}.sourceLabels"),
        errs,
    );
    check_gateway_names(&matched.gateways, &format!("{field}.gateways"), errs);
    if let Some(ns) = matched.source_namespace.as_deref() {
        if !ns.is_empty() && !is_dns1123_label(ns) {
            errs.push(
                format!("{field}.sourceNamespace"),
                format!("sourceNamespace match {ns} is invalid"),
            );
        }
    }
    warn_unknown(
        &matched.l7,
        &UNTYPED_MATCH_FIELDS,
        field,
        "an HTTP match",
        errs,
    );
}

/// The seed's `port` beside `match` lands here: the API server prunes a field its schema does
/// not name (or `kubectl apply` refuses it), so it is ignored with a warning.
fn warn_unknown(other: &Other, untyped: &[&str], field: &str, what: &str, errs: &mut Errors) {
    for key in other.keys().filter(|k| !untyped.contains(&k.as_str())) {
        errs.warn(
            format!("{field}.{key}"),
            format!("unknown field {key:?} in {what}; ignored, as the API server prunes it"),
        );
    }
}

/// Istio's `validateTLSRoute` and `validateTLSMatch`.
pub(super) fn check_tls_route(
    route: &TlsRoute,
    vs: &VirtualServiceSpec,
    field: &str,
    errs: &mut Errors,
) {
    if route.matches.is_empty() {
        errs.push(
            format!("{field}.match"),
            "TLS route must have at least one match condition",
        );
    }
    for (m, matched) in route.matches.iter().enumerate() {
        check_tls_match(matched, vs, &format!("{field}.match[{m}]"), errs);
    }
    if route.route.is_empty() {
        errs.push(format!("{field}.route"), "TLS route is required");
    }
    check_route_destinations(&route.route, field, errs);
}

fn check_tls_match(matched: &TlsMatch, vs: &VirtualServiceSpec, field: &str, errs: &mut Errors) {
    if matched.sni_hosts.is_empty() {
        errs.push(
            format!("{field}.sniHosts"),
            "TLS match must have at least one SNI host",
        );
    }
    for (i, sni) in matched.sni_hosts.iter().enumerate() {
        check_sni_host(sni, vs, &format!("{field}.sniHosts[{i}]"), errs);
    }
    check_l4_match(&matched.l4, field, errs);
}

/// Istio's `validateSniHost`: a name (an IP only warns) within one of the VirtualService's
/// hosts, since the route is only looked up under those hosts.
fn check_sni_host(sni: &str, vs: &VirtualServiceSpec, field: &str, errs: &mut Errors) {
    if let Err(msg) = wildcard_domain(sni) {
        if sni.parse::<IpAddr>().is_ok() {
            errs.warn(
                field,
                format!("using an IP address ({sni:?}) goes against SNI spec and most clients do not support this"),
            );
        } else {
            errs.push(field, msg);
        }
        return;
    }
    if !vs.hosts.iter().any(|h| host_subset_of(sni, h)) {
        errs.push(
            field,
            format!(
                "SNI host {sni:?} is not a compatible subset of any of the virtual service hosts: [{}]",
                vs.hosts.join(", ")
            ),
        );
    }
}

/// Istio's `validateTCPRoute` and `validateTCPMatch`.
pub(super) fn check_tcp_route(route: &TcpRoute, field: &str, errs: &mut Errors) {
    for (m, matched) in route.matches.iter().enumerate() {
        check_l4_match(matched, &format!("{field}.match[{m}]"), errs);
    }
    if route.route.is_empty() {
        errs.push(format!("{field}.route"), "TCP route is required");
    }
    check_route_destinations(&route.route, field, errs);
}

/// What TLS and TCP matches share.
fn check_l4_match(l4: &L4Match, field: &str, errs: &mut Errors) {
    for (i, subnet) in l4.destination_subnets.iter().enumerate() {
        if parse_ip_or_cidr(subnet).is_none() {
            errs.push(
                format!("{field}.destinationSubnets[{i}]"),
                format!("{subnet} is not a valid IP or CIDR block"),
            );
        }
    }
    check_match_port(l4.port, field, errs);
    check_labels(&l4.source_labels, &format!("{field}.sourceLabels"), errs);
    check_gateway_names(&l4.gateways, &format!("{field}.gateways"), errs);
}

/// A match port of 0 is unset, as in the proto.
fn check_match_port(port: Option<u32>, field: &str, errs: &mut Errors) {
    if let Some(n) = port.filter(|n| *n > 65535) {
        errs.push(
            format!("{field}.port"),
            format!("port number {n} must be in the range 1..65535"),
        );
    }
}

/// Istio's `validateRouteDestinations` (HTTP's too): each with a destination, weights not
/// negative, and not all zero when there are several.
fn check_route_destinations(routes: &[RouteDestination], field: &str, errs: &mut Errors) {
    let mut total = 0;
    for (k, dest) in routes.iter().enumerate() {
        let field = format!("{field}.route[{k}]");
        match &dest.destination {
            None => errs.push(format!("{field}.destination"), "destination is required"),
            Some(d) => check_destination(d, &format!("{field}.destination"), errs),
        }
        let weight = dest.weight.unwrap_or(0);
        if weight < 0 {
            errs.push(format!("{field}.weight"), format!("weight {weight} < 0"));
        }
        total += weight;
    }
    if routes.len() > 1 && total == 0 {
        errs.push(format!("{field}.route"), "total destination weight = 0");
    }
}

/// Istio's `validateDestination`.
fn check_destination(d: &Destination, field: &str, errs: &mut Errors) {
    let host = match d.host.as_str() {
        "" => Err("a destination host is required".to_string()),
        "*" => Err("invalid destination host *".to_string()),
        host => wildcard_domain(host),
    };
    if let Err(msg) = host {
        errs.push(format!("{field}.host"), msg);
    }
    if let Some(subset) = d.subset.as_deref().filter(|s| !s.is_empty()) {
        if let Err(msg) = check_subset_name(subset) {
            errs.push(format!("{field}.subset"), msg);
        }
    }
    if let Some(port) = d.port.filter(|p| !(1..=65535).contains(&p.number)) {
        errs.push(
            format!("{field}.port.number"),
            format!("port number {} must be in the range 1..65535", port.number),
        );
    }
}

/// Istio's `validateGatewayNames`: `mesh`, `namespace/name` (both DNS labels), or a short
/// name, which must be a DNS name; the legacy `name.namespace.svc.<domain>` form warns.
pub(super) fn check_gateway_names(names: &[String], field: &str, errs: &mut Errors) {
    for (i, name) in names.iter().enumerate() {
        let field = format!("{field}[{i}]");
        let Some((ns, gateway)) = name.split_once('/') else {
            if let Some((short, rest)) = name.split_once('.') {
                let ns = rest.split('.').next().unwrap_or_default();
                errs.warn(
                    &field,
                    format!("using legacy gatewayName format {name:?}; prefer the <namespace>/<name> format: \"{ns}/{short}\""),
                );
            }
            if let Err(msg) = check_fqdn(name) {
                errs.push(field, msg);
            }
            continue;
        };
        if ns.is_empty() || gateway.is_empty() {
            errs.push(&field, "config namespace and gateway name cannot be empty");
        }
        if !is_dns1123_label(ns) {
            errs.push(&field, format!("invalid value for namespace: {ns:?}"));
        }
        if !is_dns1123_label(gateway) {
            errs.push(
                &field,
                format!("invalid value for gateway name: {gateway:?}"),
            );
        }
    }
}

/// Istio's `ValidateFQDN`: a DNS name without wildcards.
fn check_fqdn(name: &str) -> Result<(), String> {
    if name.contains('*') {
        return Err(format!("{name:?}: a gateway name cannot be a wildcard"));
    }
    check_host(name)
}
