//! Gateway, VirtualService and DestinationRule checked as Istio's `pkg/config/validation`
//! checks them (`ValidateGateway`, `ValidateVirtualService`, `ValidateDestinationRule`), for the
//! fields that are typed. An object with an error is skipped whole, as Istio's webhook would
//! refuse it. A Gateway's servers are checked in `validate_server`, a VirtualService's routes in
//! `validate_route`.

use std::{collections::BTreeMap, net::IpAddr};

use super::{
    validate::{check_host, check_namespace, export_to_errors, is_dns1123_label, Errors},
    validate_route::{check_gateway_names, check_http_route, check_tcp_route, check_tls_route},
    validate_server::{check_server, check_server_port_names},
    validate_workload::check_labels,
};
use crate::{
    diag::Problem,
    istio::{
        routing::{host_matches, ClientTls, TrafficPolicy, VirtualServiceSpec, MESH_GATEWAY},
        DestinationRule, Gateway, VirtualService,
    },
};

/// `ClientTLSSettings.TLSmode`; unset reads as the first, DISABLE.
const CLIENT_TLS_MODES: [&str; 4] = ["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"];

pub fn validate_gateway(gw: &Gateway) -> Vec<Problem> {
    let mut errs = Errors::new("Gateway", gw);
    check_namespace(&gw.namespace, &mut errs);
    // Istio: the name is referred to as `namespace/name`, so it cannot hold dots.
    if !is_dns1123_label(&gw.name) {
        errs.push(
            "metadata.name",
            format!("invalid gateway name: {:?}", gw.name),
        );
    }
    if gw.spec.servers.is_empty() {
        errs.push("spec.servers", "gateway must have at least one server");
    }
    for (i, server) in gw.spec.servers.iter().enumerate() {
        check_server(server, &format!("spec.servers[{i}]"), &mut errs);
    }
    check_server_port_names(&gw.spec.servers, &mut errs);
    errs.out
}

pub fn validate_virtual_service(vs: &VirtualService) -> Vec<Problem> {
    let mut errs = Errors::new("VirtualService", vs);
    check_namespace(&vs.namespace, &mut errs);
    let spec = &vs.spec;
    // Without hosts the VirtualService is a delegate, bound through its root's HTTP routes.
    let delegate = spec.hosts.is_empty();
    if delegate {
        check_delegate(spec, &mut errs);
    }
    check_gateway_names(&spec.gateways, "spec.gateways", &mut errs);
    check_vs_hosts(spec, &mut errs);
    if spec.http.is_empty() && spec.tls.is_empty() && spec.tcp.is_empty() {
        errs.push(
            "spec",
            "http, tcp or tls must be provided in virtual service",
        );
    }
    for (i, route) in spec.http.iter().enumerate() {
        check_http_route(route, delegate, &format!("spec.http[{i}]"), &mut errs);
    }
    for (i, route) in spec.tls.iter().enumerate() {
        check_tls_route(route, spec, &format!("spec.tls[{i}]"), &mut errs);
    }
    for (i, route) in spec.tcp.iter().enumerate() {
        check_tcp_route(route, &format!("spec.tcp[{i}]"), &mut errs);
    }
    if let Some(list) = &spec.export_to {
        check_config_export_to(list, &vs.namespace, false, &mut errs);
    }
    errs.out
}

pub fn validate_destination_rule(dr: &DestinationRule) -> Vec<Problem> {
    let mut errs = Errors::new("DestinationRule", dr);
    check_namespace(&dr.namespace, &mut errs);
    let spec = &dr.spec;
    if let Err(msg) = wildcard_domain(&spec.host) {
        errs.push("spec.host", msg);
    }
    if let Some(policy) = &spec.traffic_policy {
        check_traffic_policy(policy, "spec.trafficPolicy", &mut errs);
    }
    for (i, subset) in spec.subsets.iter().enumerate() {
        let field = format!("spec.subsets[{i}]");
        if spec.subsets[..i].iter().any(|s| s.name == subset.name) {
            errs.push(
                format!("{field}.name"),
                format!("duplicate subset names: {}", subset.name),
            );
        }
        if let Err(msg) = check_subset_name(&subset.name) {
            errs.push(format!("{field}.name"), msg);
        }
        check_labels(&subset.labels, &format!("{field}.labels"), &mut errs);
        if let Some(policy) = &subset.traffic_policy {
            check_traffic_policy(policy, &format!("{field}.trafficPolicy"), &mut errs);
        }
    }
    let selector = spec.workload_selector.as_ref().map(|s| &s.match_labels);
    if let Some(list) = &spec.export_to {
        check_config_export_to(list, &dr.namespace, selector.is_some(), &mut errs);
    }
    if let Some(labels) = selector {
        check_match_labels(labels, &mut errs);
    }
    errs.out
}

/// Istio's `ValidateWildcardDomain`, which, unlike a ServiceEntry host, allows `*` alone.
pub(super) fn wildcard_domain(host: &str) -> Result<(), String> {
    if host == "*" {
        Ok(())
    } else {
        check_host(host)
    }
}

pub(super) fn is_set(value: &Option<String>) -> bool {
    value.as_deref().is_some_and(|s| !s.is_empty())
}

/// Istio's `validateSubsetName`.
pub(super) fn check_subset_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        Err("subset name cannot be empty".to_string())
    } else if !is_dns1123_label(name) {
        Err(format!("subset name is invalid: {name}"))
    } else {
        Ok(())
    }
}

fn check_delegate(spec: &VirtualServiceSpec, errs: &mut Errors) {
    if !spec.gateways.is_empty() {
        errs.push(
            "spec.gateways",
            "delegate virtual service must have no gateways specified",
        );
    }
    if !spec.tls.is_empty() {
        errs.push(
            "spec.tls",
            "delegate virtual service must have no tls route specified",
        );
    }
    if !spec.tcp.is_empty() {
        errs.push(
            "spec.tcp",
            "delegate virtual service must have no tcp route specified",
        );
    }
}

/// Istio: hosts are names (short ones too), wildcards or IPs; `*` alone only when the
/// VirtualService is not bound to the mesh; no two hosts overlap.
fn check_vs_hosts(spec: &VirtualServiceSpec, errs: &mut Errors) {
    let to_mesh = spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == MESH_GATEWAY);
    let mut all_valid = true;
    for (i, host) in spec.hosts.iter().enumerate() {
        let problem = match wildcard_domain(host) {
            Err(_) if host.parse::<IpAddr>().is_ok() => None,
            Err(msg) => Some(msg),
            Ok(()) if to_mesh && host == "*" => Some(
                "wildcard host * is not allowed for virtual services bound to the mesh gateway"
                    .to_string(),
            ),
            Ok(()) => None,
        };
        if let Some(msg) = problem {
            errs.push(format!("spec.hosts[{i}]"), msg);
            all_valid = false;
        }
    }
    if !all_valid {
        return;
    }
    for (i, a) in spec.hosts.iter().enumerate() {
        for b in spec.hosts[i + 1..].iter().filter(|b| host_matches(a, b)) {
            errs.push(
                format!("spec.hosts[{i}]"),
                format!("duplicate hosts in virtual service: {a} & {b}"),
            );
        }
    }
}

/// Istio's `validateTrafficPolicy` and `validatePortTrafficPolicies`, for the TLS settings
/// and the ports (the rest is not typed, only counted as present).
fn check_traffic_policy(policy: &TrafficPolicy, field: &str, errs: &mut Errors) {
    if policy.tls.is_none() && policy.port_level_settings.is_empty() && policy.other.is_empty() {
        errs.push(field, "traffic policy must have at least one field");
        return;
    }
    if let Some(tls) = &policy.tls {
        check_client_tls(tls, &format!("{field}.tls"), errs);
    }
    for (i, settings) in policy.port_level_settings.iter().enumerate() {
        let field = format!("{field}.portLevelSettings[{i}]");
        if settings.port.is_none() {
            errs.push(
                format!("{field}.port"),
                "portTrafficPolicy must have valid port",
            );
        }
        match &settings.tls {
            Some(tls) => check_client_tls(tls, &format!("{field}.tls"), errs),
            None if settings.other.is_empty() => {
                errs.push(field, "port traffic policy must have at least one field")
            }
            None => {}
        }
    }
}

/// Istio's `ValidateTLS` (client side), for the typed fields.
fn check_client_tls(tls: &ClientTls, field: &str, errs: &mut Errors) {
    let mode = tls.mode.as_deref().unwrap_or("DISABLE");
    if !CLIENT_TLS_MODES.contains(&mode) {
        errs.push(
            format!("{field}.mode"),
            format!("unknown TLS mode {mode:?}; expected one of {CLIENT_TLS_MODES:?}"),
        );
        return;
    }
    let files = is_set(&tls.client_certificate) || is_set(&tls.private_key);
    if matches!(mode, "SIMPLE" | "MUTUAL") && is_set(&tls.credential_name) {
        if files {
            errs.push(
                field,
                "cannot specify client certificates or CA certificate or CA CRL If credentialName is set",
            );
        }
        return;
    }
    if mode == "MUTUAL" {
        if !is_set(&tls.client_certificate) {
            errs.push(
                format!("{field}.clientCertificate"),
                "client certificate required for mutual tls",
            );
        }
        if !is_set(&tls.private_key) {
            errs.push(
                format!("{field}.privateKey"),
                "private key required for mutual tls",
            );
        }
    }
}

/// Istio's `validateExportTo` for a VirtualService or DestinationRule: as for a ServiceEntry,
/// but `~` is refused, and a DestinationRule with a workloadSelector stays in its namespace.
fn check_config_export_to(list: &[String], namespace: &str, selector: bool, errs: &mut Errors) {
    let field = "spec.exportTo";
    for msg in export_to_errors(list) {
        errs.push(field, msg);
    }
    if list.iter().any(|v| v == "~") {
        errs.push(
            field,
            "exportTo ~ (none) is not allowed for Istio configuration objects",
        );
    }
    if list.iter().any(|v| v == ".") && list.iter().any(|v| v == namespace) {
        errs.push(
            field,
            format!("duplicate entries in exportTo: . and current namespace {namespace}"),
        );
    }
    let local = |v: &&String| *v == "." || *v == namespace;
    if selector && !list.is_empty() {
        if !list.iter().any(|v| local(&v)) {
            errs.push(
                field,
                "destination rule with workload selector cannot have exportTo beyond current namespace",
            );
        } else if !list.iter().all(|v| local(&v)) {
            errs.push(
                field,
                "destination rule with workload selector cannot have multiple entries in exportTo",
            );
        }
    }
}

/// Istio's `validateWorkloadSelector`.
fn check_match_labels(labels: &BTreeMap<String, String>, errs: &mut Errors) {
    let field = "spec.workloadSelector.matchLabels";
    if labels.is_empty() {
        errs.warn(field, "workload selector specified without labels");
    }
    for (key, value) in labels {
        if key.is_empty() || key.contains('*') || value.contains('*') {
            errs.push(
                format!("{field}.{key}"),
                "empty keys and wildcards are not supported in selectors",
            );
        }
    }
}

#[cfg(test)]
#[path = "validate_routing_tests.rs"]
mod tests;
