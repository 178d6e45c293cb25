//! Istio's validation of WorkloadEntry and Sidecar objects.

use std::net::IpAddr;

use super::{
    l4_of_protocol,
    validate::{
        check_host, check_namespace, check_selector, check_unix_address, is_dns1123_label,
        is_partial_wildcard, Errors,
    },
};
use crate::{
    diag::Problem,
    istio::{EgressListener, OutboundMode, Sidecar, WorkloadEntry},
};

pub fn validate_workload_entry(we: &WorkloadEntry) -> Vec<Problem> {
    let mut errs = Errors::new("WorkloadEntry", we);
    check_namespace(&we.namespace, &mut errs);
    let spec = &we.spec;
    match spec.address.as_deref() {
        None | Some("") if spec.network.as_deref().unwrap_or_default().is_empty() => errs.push(
            "spec.address",
            "an address is required when no network is given",
        ),
        None | Some("") => errs.warn(
            "spec.address",
            format!(
                "address is unset with network {:?}",
                spec.network.as_deref().unwrap_or_default()
            ),
        ),
        Some(uds) if uds.starts_with("unix://") => {
            if let Err(msg) = check_unix_address(uds) {
                errs.push("spec.address", msg);
            }
            if !spec.ports.is_empty() {
                errs.push(
                    "spec.ports",
                    format!("unix endpoint {uds} must not include ports"),
                );
            }
        }
        Some(addr) if addr.parse::<IpAddr>().is_ok() => {}
        Some(addr) => {
            // A name: used when the selecting ServiceEntry has DNS resolution.
            if let Err(msg) = check_host(addr).and_then(|()| {
                if addr.contains('*') {
                    Err("an address cannot be a wildcard".to_string())
                } else {
                    Ok(())
                }
            }) {
                errs.push("spec.address", msg);
            }
        }
    }
    for (name, number) in &spec.ports {
        if !is_dns1123_label(name) {
            errs.push(
                format!("spec.ports.{name}"),
                format!("{name:?} is not a valid port name"),
            );
        }
        if !(1..=65535).contains(number) {
            errs.push(
                format!("spec.ports.{name}"),
                format!("{number} is not a port number (1-65535)"),
            );
        }
    }
    check_labels(&spec.labels, "spec.labels", &mut errs);
    errs.out
}

pub fn validate_sidecar(sc: &Sidecar) -> Vec<Problem> {
    let mut errs = Errors::new("Sidecar", sc);
    check_namespace(&sc.namespace, &mut errs);
    let spec = &sc.spec;
    if spec.egress.is_empty() && spec.ingress.is_empty() && spec.outbound_traffic_policy.is_none() {
        errs.push("spec", "sidecar: empty configuration provided");
    }
    if let Some(selector) = &spec.workload_selector {
        check_selector(selector, &mut errs);
        check_labels(&selector.labels, "spec.workloadSelector.labels", &mut errs);
    }
    for (i, egress) in spec.egress.iter().enumerate() {
        if egress.hosts.is_empty() {
            errs.push(
                format!("spec.egress[{i}].hosts"),
                "at least one host is required",
            );
        }
        for (j, host) in egress.hosts.iter().enumerate() {
            if let Err(msg) = check_import(host) {
                errs.push(format!("spec.egress[{i}].hosts[{j}]"), msg);
            }
        }
    }
    check_egress_ports(&spec.egress, &mut errs);
    if let Some(policy) = &spec.outbound_traffic_policy {
        check_egress_proxy(policy, &mut errs);
    }
    if let Some(mode) = spec.outbound_traffic_policy.as_ref().and_then(|p| p.mode) {
        if mode == OutboundMode::Audit {
            errs.warn(
                "spec.outboundTrafficPolicy.mode",
                "AUDIT is an enforcer extension; Istio accepts only REGISTRY_ONLY and ALLOW_ANY here",
            );
        }
    }
    errs.out
}

/// Istio's `validateSidecarOutboundTrafficPolicy`: an egress proxy only with an explicit
/// ALLOW_ANY (an unset mode reads as REGISTRY_ONLY there), a host that is a name, and a port.
fn check_egress_proxy(policy: &crate::istio::OutboundTrafficPolicy, errs: &mut Errors) {
    let Some(proxy) = &policy.egress_proxy else {
        return;
    };
    let field = "spec.outboundTrafficPolicy.egressProxy";
    if policy.mode != Some(OutboundMode::AllowAny) {
        errs.push(
            field,
            "sidecar: egress_proxy must be set only with ALLOW_ANY outbound_traffic_policy mode",
        );
        return;
    }
    match proxy.host.as_deref() {
        Some(host) if !host.contains('*') => {
            if let Err(msg) = super::validate::check_host(host) {
                errs.push(format!("{field}.host"), msg);
            }
        }
        Some(host) => errs.push(
            format!("{field}.host"),
            format!("{host:?} is not a name (no wildcards)"),
        ),
        None => errs.push(format!("{field}.host"), "a host is required"),
    }
    match proxy.port.as_ref().map(|p| p.number) {
        None => errs.push(
            format!("{field}.port"),
            "sidecar: egress_proxy port must be non-nil",
        ),
        Some(Some(n)) if (1..=65535).contains(&n) => {}
        Some(n) => errs.push(
            format!("{field}.port.number"),
            format!("{} is not a port number (1-65535)", n.unwrap_or(0)),
        ),
    }
}

/// Istio's listener rules: one catch-all listener (no port), last; unique ports; known protocols.
fn check_egress_ports(listeners: &[EgressListener], errs: &mut Errors) {
    let mut seen = std::collections::BTreeSet::new();
    let mut catch_all = false;
    for (i, listener) in listeners.iter().enumerate() {
        let Some(port) = &listener.port else {
            if catch_all {
                errs.push(
                    format!("spec.egress[{i}]"),
                    "sidecar: egress can have only one listener with empty port",
                );
            } else if i + 1 != listeners.len() {
                errs.push(
                    format!("spec.egress[{i}]"),
                    "sidecar: the egress listener with empty port should be the last listener in the list",
                );
            }
            catch_all = true;
            continue;
        };
        let uds = listener
            .bind
            .as_deref()
            .is_some_and(|b| b.starts_with("unix://"));
        let valid = (1..=65535).contains(&port.number) || (uds && port.number == 0);
        if !valid {
            errs.push(
                format!("spec.egress[{i}].port.number"),
                format!("{} is not a port number (1-65535)", port.number),
            );
        }
        let protocol = port.protocol.as_deref();
        if l4_of_protocol(protocol).is_none() {
            errs.push(
                format!("spec.egress[{i}].port.protocol"),
                format!("unrecognized protocol {:?}", protocol.unwrap_or_default()),
            );
        }
        if port.number != 0 && !seen.insert(port.number) {
            errs.push(
                format!("spec.egress[{i}].port.number"),
                "sidecar: ports on IP bound listeners must be unique",
            );
        }
    }
}

/// A Sidecar egress host: `namespace/dnsName`, where namespace is `.`, `*`, `~` or a name, and
/// dnsName is `*` or a host name, possibly with a leading wildcard.
fn check_import(host: &str) -> Result<(), String> {
    let Some((ns, name)) = host.split_once('/') else {
        return Err(format!(
            "{host:?} must have the form namespace/dnsName (for example ./* or */api.example.com)"
        ));
    };
    if !(ns == "." || ns == "*" || ns == "~" || is_dns1123_label(ns)) {
        return Err(format!(
            "{ns:?} is neither '.', '*', '~' nor a namespace name"
        ));
    }
    if name == "*" {
        return Ok(());
    }
    if !name.contains('.') {
        return Err(format!("{name:?}: short names (non FQDN) are not allowed"));
    }
    if is_partial_wildcard(name) {
        return Err(format!("partial wildcard {name:?} not allowed"));
    }
    check_host(name)
}

/// A Kubernetes label key: an optional DNS prefix and `/`, then a name of at most 63 characters.
pub fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    label_part(name) && prefix.is_none_or(|p| p.split('.').all(is_dns1123_label))
}

/// A Kubernetes label value: empty, or like a label name.
pub fn is_label_value(value: &str) -> bool {
    value.is_empty() || label_part(value)
}

fn label_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

pub(super) fn check_labels(
    labels: &std::collections::BTreeMap<String, String>,
    field: &str,
    errs: &mut Errors,
) {
    for (key, value) in labels {
        if !is_label_key(key) {
            errs.push(
                format!("{field}.{key}"),
                format!("{key:?} is not a valid label key"),
            );
        }
        if !is_label_value(value) {
            errs.push(
                format!("{field}.{key}"),
                format!("{value:?} is not a valid label value"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::documents::parse_documents;

    fn problems(kind: &str, spec: &str) -> Vec<Problem> {
        let yaml = format!("apiVersion: networking.istio.io/v1\nkind: {kind}\nmetadata: {{name: x, namespace: ns}}\nspec: {spec}\n");
        let snap = parse_documents("t.yaml", &yaml);
        assert!(snap.problems.is_empty(), "{:?}", snap.problems);
        match kind {
            "WorkloadEntry" => validate_workload_entry(&snap.workload_entries[0]),
            _ => validate_sidecar(&snap.sidecars[0]),
        }
    }

    const CASES: &[(&str, &str, Option<&str>)] = &[
        (
            "WorkloadEntry",
            "{address: 198.51.100.5, ports: {http: 8080}, labels: {app: db}}",
            None,
        ),
        (
            "WorkloadEntry",
            "{address: vm1.example.com, labels: {app: db}}",
            None,
        ),
        ("WorkloadEntry", "{labels: {app: db}}", Some("spec.address")),
        ("WorkloadEntry", "{network: vpc-1}", None),
        ("WorkloadEntry", "{address: 'unix://@abstract'}", None),
        (
            "WorkloadEntry",
            "{address: 'unix:///var/run/db.sock'}",
            None,
        ),
        (
            "WorkloadEntry",
            "{address: 'unix:///var/run/db.sock', ports: {http: 80}}",
            Some("spec.ports"),
        ),
        (
            "WorkloadEntry",
            "{address: '*.example.com'}",
            Some("spec.address"),
        ),
        (
            "WorkloadEntry",
            "{address: 198.51.100.5, ports: {http: 0}}",
            Some("spec.ports.http"),
        ),
        (
            "WorkloadEntry",
            "{address: 198.51.100.5, labels: {'-bad': x}}",
            Some("spec.labels.-bad"),
        ),
        (
            "WorkloadEntry",
            "{address: 'unix://relative.sock'}",
            Some("spec.address"),
        ),
        (
            "Sidecar",
            "{outboundTrafficPolicy: {mode: REGISTRY_ONLY}}",
            None,
        ),
        (
            "Sidecar",
            "{workloadSelector: {labels: {app: web}}}",
            Some("spec"),
        ),
        (
            "Sidecar",
            "{egress: [{hosts: ['*/api']}]}",
            Some("spec.egress[0].hosts[0]"),
        ),
        (
            "Sidecar",
            "{egress: [{hosts: ['*/*api.example.com']}]}",
            Some("spec.egress[0].hosts[0]"),
        ),
        (
            "Sidecar",
            "{egress: [{hosts: ['ns1/*']}], workloadSelector: {labels: {'app*': x}}}",
            Some("spec.workloadSelector.labels.app*"),
        ),
        (
            "Sidecar",
            "{egress: [{hosts: ['./*', 'istio-system/*', '*/api.example.com', '~/*']}]}",
            None,
        ),
        (
            "Sidecar",
            "{egress: [{hosts: ['api.example.com']}]}",
            Some("spec.egress[0].hosts[0]"),
        ),
        (
            "Sidecar",
            "{egress: [{hosts: ['Bad_NS/*']}]}",
            Some("spec.egress[0].hosts[0]"),
        ),
        (
            "Sidecar",
            "{egress: [{hosts: []}]}",
            Some("spec.egress[0].hosts"),
        ),
        (
            "Sidecar",
            "{workloadSelector: {labels: {}}, egress: [{hosts: ['./*']}]}",
            None,
        ),
        (
            "Sidecar",
            "{workloadSelector: {labels: {app: web}}, outboundTrafficPolicy: {mode: ALLOW_ANY}}",
            None,
        ),
        (
            "Sidecar",
            "{egress: [{port: {number: 443, protocol: TLS, name: tls}, hosts: ['*/*']}, {hosts: ['./*']}]}",
            None,
        ),
        (
            "Sidecar",
            "{egress: [{hosts: ['./*']}, {port: {number: 443, protocol: TLS, name: tls}, hosts: ['*/*']}]}",
            Some("spec.egress[0]"),
        ),
        (
            "Sidecar",
            "{egress: [{port: {number: 443, protocol: TLS}, hosts: ['*/*']}, {port: {number: 443, protocol: TCP}, hosts: ['./*']}]}",
            Some("spec.egress[1].port.number"),
        ),
        (
            "Sidecar",
            "{egress: [{port: {number: 70000, protocol: TCP}, hosts: ['*/*']}]}",
            Some("spec.egress[0].port.number"),
        ),
        (
            "Sidecar",
            "{egress: [{port: {number: 25, protocol: SMTP}, hosts: ['*/*']}]}",
            Some("spec.egress[0].port.protocol"),
        ),
        (
            "Sidecar",
            "{outboundTrafficPolicy: {mode: ALLOW_ANY, egressProxy: {host: proxy.example.com, port: {number: 3128}}}}",
            None,
        ),
        (
            "Sidecar",
            "{outboundTrafficPolicy: {mode: REGISTRY_ONLY, egressProxy: {host: proxy.example.com, port: {number: 3128}}}}",
            Some("spec.outboundTrafficPolicy.egressProxy"),
        ),
        // Unset reads as REGISTRY_ONLY in Istio's check.
        (
            "Sidecar",
            "{outboundTrafficPolicy: {egressProxy: {host: proxy.example.com, port: {number: 3128}}}}",
            Some("spec.outboundTrafficPolicy.egressProxy"),
        ),
        (
            "Sidecar",
            "{outboundTrafficPolicy: {mode: ALLOW_ANY, egressProxy: {host: proxy.example.com}}}",
            Some("spec.outboundTrafficPolicy.egressProxy.port"),
        ),
        (
            "Sidecar",
            "{outboundTrafficPolicy: {mode: ALLOW_ANY, egressProxy: {host: '*.example.com', port: {number: 3128}}}}",
            Some("spec.outboundTrafficPolicy.egressProxy.host"),
        ),
    ];

    #[test]
    fn validation_table() {
        for (i, (kind, spec, want)) in CASES.iter().enumerate() {
            let found = problems(kind, spec);
            let errors: Vec<&Problem> = found.iter().filter(|p| p.is_error()).collect();
            match want {
                None => assert!(
                    errors.is_empty(),
                    "case {i} ({kind} {spec}) should be valid: {errors:?}"
                ),
                Some(field) => assert!(
                    errors.iter().any(|p| p.field == *field),
                    "case {i} ({kind} {spec}) wanted an error at {field}: {found:?}"
                ),
            }
        }
    }

    #[test]
    fn every_kind_checks_its_namespace() {
        let long = "n".repeat(64);
        // 46 bytes of two-byte characters: a scope name cut at byte 44 splits none, at 45 one.
        let accented = "é".repeat(23);
        for (kind, spec) in [
            ("WorkloadEntry", "{address: 198.51.100.5}"),
            (
                "Sidecar",
                "{workloadSelector: {labels: {app: web}}, egress: [{hosts: ['./*']}]}",
            ),
        ] {
            for ns in [long.as_str(), accented.as_str(), "Shop", "-shop"] {
                let yaml = format!("apiVersion: networking.istio.io/v1\nkind: {kind}\nmetadata: {{name: x, namespace: '{ns}'}}\nspec: {spec}\n");
                let checked = crate::policy::check::check(parse_documents("t.yaml", &yaml));
                assert!(
                    checked
                        .problems
                        .iter()
                        .any(|p| p.is_error() && p.field == "metadata.namespace"),
                    "{kind} in {ns:?}: {:?}",
                    checked.problems
                );
                assert!(
                    checked.workload_entries.is_empty() && checked.sidecars.is_empty(),
                    "{kind} in {ns:?} is skipped"
                );
            }
        }
    }

    #[test]
    fn audit_in_a_sidecar_is_a_warning() {
        let found = problems("Sidecar", "{outboundTrafficPolicy: {mode: AUDIT}}");
        assert_eq!(found.len(), 1);
        assert!(!found[0].is_error());
    }

    #[test]
    fn unknown_sidecar_mode_is_an_error_with_its_field() {
        let yaml = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: x}\nspec: {outboundTrafficPolicy: {mode: SOMETIMES}}\n";
        let snap = parse_documents("t.yaml", yaml);
        assert_eq!(snap.problems[0].field, "spec.outboundTrafficPolicy.mode");
    }
}
