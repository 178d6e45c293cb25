//! Checks a ServiceEntry before it is compiled. An object with any error is skipped whole, so a
//! mistake can only ever remove what that object allowed.
//!
//! The rules follow Istio's `ValidateServiceEntry` for the fields the kernel relies on.

use std::net::IpAddr;

use crate::{
    diag::Problem,
    istio::{Object, Resolution, ServiceEntry, WorkloadSelector},
    net::parse_ip_or_cidr,
};

use super::l4_of_protocol;

/// Returns every problem found in `se`: errors make it invalid, warnings do not.
pub fn validate_service_entry(se: &ServiceEntry) -> Vec<Problem> {
    let mut errs = Errors::new("ServiceEntry", se);
    let spec = &se.spec;

    check_namespace(&se.namespace, &mut errs);
    if spec.hosts.is_empty() {
        errs.push("spec.hosts", "at least one host is required");
    }
    for (i, host) in spec.hosts.iter().enumerate() {
        if let Err(msg) = check_host(host) {
            errs.push(format!("spec.hosts[{i}]"), msg);
        } else if is_partial_wildcard(host) {
            errs.warn(
                format!("spec.hosts[{i}]"),
                format!("partial wildcard {host:?} not allowed"),
            );
        }
    }
    // Istio: without NONE resolution, several hosts can share only HTTP or TLS ports.
    let http_or_tls = |p: &crate::istio::Port| {
        matches!(
            p.protocol
                .as_deref()
                .unwrap_or_default()
                .to_ascii_uppercase()
                .as_str(),
            "HTTP" | "HTTP2" | "HTTP_PROXY" | "GRPC" | "GRPC-WEB" | "HTTPS" | "TLS"
        )
    };
    if spec.resolution != Resolution::None
        && spec.hosts.len() > 1
        && !spec.ports.iter().all(http_or_tls)
    {
        errs.push(
            "spec.hosts",
            "multiple hosts provided with non-HTTP, non-TLS ports",
        );
    }

    for (i, addr) in spec.addresses.iter().enumerate() {
        match parse_ip_or_cidr(addr) {
            None => errs.push(
                format!("spec.addresses[{i}]"),
                format!("{addr:?} is not an IP address or CIDR"),
            ),
            Some(net)
                if net.prefix_len() != net.max_prefix_len()
                    && !matches!(spec.resolution, Resolution::None | Resolution::Static) =>
            {
                errs.push(
                    format!("spec.addresses[{i}]"),
                    "CIDR addresses are allowed only with resolution NONE or STATIC",
                )
            }
            Some(_) => {}
        }
    }

    // Istio accepts an entry without ports; it allows nothing here (`analyze`: ENF0106).
    for (i, port) in spec.ports.iter().enumerate() {
        let name = port.name.as_deref().unwrap_or_default();
        if !is_dns1123_label(name) {
            errs.push(
                format!("spec.ports[{i}].name"),
                format!("invalid port name: {name:?}"),
            );
        }
        if !(1..=65535).contains(&port.number) {
            errs.push(
                format!("spec.ports[{i}].number"),
                format!("{} is not a port number (1-65535)", port.number),
            );
        }
        if let Some(target) = port.target_port.filter(|t| !(1..=65535).contains(t)) {
            errs.push(
                format!("spec.ports[{i}].targetPort"),
                format!("{target} is not a port number (1-65535)"),
            );
        }
        if l4_of_protocol(port.protocol.as_deref()).is_none() {
            errs.push(
                format!("spec.ports[{i}].protocol"),
                format!(
                    "unrecognized protocol {:?}",
                    port.protocol.as_deref().unwrap_or_default()
                ),
            );
        }
        let name = port.name.as_deref().unwrap_or_default();
        if spec.ports[..i].iter().any(|p| p.number == port.number) {
            errs.push(
                format!("spec.ports[{i}].number"),
                format!("port number {} is declared twice", port.number),
            );
        }
        if !name.is_empty()
            && spec.ports[..i]
                .iter()
                .any(|p| p.name.as_deref() == Some(name))
        {
            errs.push(
                format!("spec.ports[{i}].name"),
                format!("port name {name:?} is declared twice"),
            );
        }
    }

    if let Some(selector) = &spec.workload_selector {
        check_selector(selector, &mut errs);
        if spec.resolution == Resolution::None {
            errs.warn(
                "spec.workloadSelector",
                "workloadSelector should not be set when resolution mode is NONE",
            );
        }
    }
    if !spec.endpoints.is_empty() && spec.workload_selector.is_some() {
        errs.push(
            "spec.workloadSelector",
            "endpoints and workloadSelector are mutually exclusive",
        );
    }
    match spec.resolution {
        Resolution::None if !spec.endpoints.is_empty() => errs.push(
            "spec.endpoints",
            "no endpoints may be given for resolution NONE",
        ),
        Resolution::DnsRoundRobin if spec.endpoints.len() > 1 => errs.push(
            "spec.endpoints",
            "resolution DNS_ROUND_ROBIN allows at most one endpoint",
        ),
        Resolution::Dns | Resolution::DnsRoundRobin if spec.endpoints.is_empty() => {
            for (i, host) in spec.hosts.iter().enumerate() {
                if host.starts_with('*') {
                    errs.push(
                        format!("spec.hosts[{i}]"),
                        "a wildcard host needs endpoints when resolution is DNS",
                    );
                }
            }
        }
        _ => {}
    }
    for (i, ep) in spec.endpoints.iter().enumerate() {
        let field = format!("spec.endpoints[{i}].address");
        match ep.address.as_deref() {
            None | Some("") if ep.network.is_none() => {
                errs.push(field, "an address or a network is required")
            }
            None | Some("") => {}
            Some(a) if a.starts_with("unix://") => {
                if spec.resolution != Resolution::Static {
                    errs.push(
                        field,
                        format!("endpoint address {a:?} is not a valid FQDN or an IP address"),
                    );
                } else if let Err(msg) = check_unix_address(a) {
                    errs.push(field, msg);
                } else if !ep.ports.is_empty() {
                    errs.push(
                        format!("spec.endpoints[{i}].ports"),
                        format!("unix endpoint {a} must not include ports"),
                    );
                } else if spec.ports.len() != 1 {
                    errs.push(
                        "spec.ports",
                        "exactly 1 service port required for unix endpoints",
                    );
                }
            }
            Some(a) if spec.resolution == Resolution::Static && a.parse::<IpAddr>().is_err() => {
                errs.push(
                    field,
                    format!("{a:?} is not an IP address; resolution STATIC needs IP endpoints"),
                )
            }
            Some(a) if a.parse::<IpAddr>().is_err() => {
                if let Err(msg) = check_host(a).and_then(|()| {
                    if a.contains('*') {
                        Err("an endpoint address cannot be a wildcard".into())
                    } else {
                        Ok(())
                    }
                }) {
                    errs.push(field, msg);
                }
            }
            Some(_) => {}
        }
        for (name, number) in &ep.ports {
            if !spec
                .ports
                .iter()
                .any(|p| p.name.as_deref() == Some(name.as_str()))
            {
                errs.push(
                    format!("spec.endpoints[{i}].ports.{name}"),
                    format!("no port named {name:?} in spec.ports"),
                );
            }
            if !(1..=65535).contains(number) {
                errs.push(
                    format!("spec.endpoints[{i}].ports.{name}"),
                    format!("{number} is not a port number (1-65535)"),
                );
            }
        }
    }

    if let Some(export_to) = &spec.export_to {
        check_export_to(export_to, "spec.exportTo", &mut errs);
        if export_to.iter().any(|v| v == ".") && export_to.contains(&se.namespace) {
            errs.push(
                "spec.exportTo",
                format!(
                    "duplicate entries in exportTo: . and current namespace {}",
                    se.namespace
                ),
            );
        }
    }
    errs.out
}

/// Every kind's namespace names a scope, and scope names must fit the pinned name map (under
/// 64 bytes) and be ASCII: an object in any other namespace is skipped, never fatal.
pub(super) fn check_namespace(namespace: &str, errs: &mut Errors) {
    if !is_dns1123_label(namespace) {
        errs.push(
            "metadata.namespace",
            format!("{namespace:?} is not a valid namespace name"),
        );
    }
}

/// Checks an `exportTo` list (also used for mesh `defaultServiceExportTo`).
pub fn export_to_errors(list: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, v) in list.iter().enumerate() {
        if list[..i].contains(v) {
            out.push(format!("duplicate entries in exportTo for entry {v}"));
        }
        if !(v == "." || v == "*" || v == "~" || is_dns1123_label(v)) {
            out.push(format!(
                "{v:?}: only ., *, ~, or a valid DNS 1123 label is allowed as exportTo entry"
            ));
        }
    }
    if list.iter().any(|v| v == "*") && list.len() > 1 {
        out.push(
            "cannot have both public (*) and non-public exportTo values for a resource".to_string(),
        );
    }
    if list.iter().any(|v| v == "~") && list.len() > 1 {
        out.push("cannot export service entry to no one (~) and someone".to_string());
    }
    out
}

fn check_export_to(list: &[String], field: &str, errs: &mut Errors) {
    for msg in export_to_errors(list) {
        errs.push(field, msg);
    }
}

/// Istio's `ValidateWildcardDomain`: the first label may be `*`, `*label` or `*-label`, the
/// others are DNS-1123 labels, and the top-level domain is not all digits.
pub(super) fn check_host(host: &str) -> Result<(), String> {
    if host == "*" {
        return Err("'*' alone is not a valid host".to_string());
    }
    if host.is_empty() || host.len() > 255 {
        return Err(format!(
            "{host:?} is not a valid DNS name (1-255 characters)"
        ));
    }
    let labels: Vec<&str> = host.trim_end_matches('.').split('.').collect();
    let first_ok = |l: &str| match l.strip_prefix('*') {
        Some("") => true,
        Some(rest) => is_dns1123_label(rest.strip_prefix('-').unwrap_or(rest)),
        None => is_dns1123_label(l),
    };
    if !first_ok(labels[0]) {
        return Err(format!("{host:?}: label {:?} is invalid (a wildcard is allowed only at the start of the first label)", labels[0]));
    }
    if let Some(bad) = labels[1..].iter().find(|l| !is_dns1123_label(l)) {
        return Err(format!("{host:?}: label {bad:?} is invalid"));
    }
    if labels.len() > 1
        && labels
            .last()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "{host:?}: the top-level domain cannot be all digits"
        ));
    }
    Ok(())
}

/// Istio's `ValidateAlphaWorkloadSelector`, for ServiceEntry and Sidecar alike.
pub(super) fn check_selector(selector: &WorkloadSelector, errs: &mut Errors) {
    if selector.labels.is_empty() {
        errs.warn(
                "spec.workloadSelector.labels",
                "workload selector specified without labels, will be applied to all workloads in the namespace",
            );
    }
    for (key, value) in &selector.labels {
        if key.is_empty() || key.contains('*') || value.contains('*') {
            errs.push(
                format!("spec.workloadSelector.labels.{key}"),
                "empty keys and wildcards are not supported in selectors",
            );
        }
    }
}

/// `unix:///absolute/path` or an abstract socket `unix://@name`.
pub(super) fn check_unix_address(address: &str) -> Result<(), String> {
    let path = address.trim_start_matches("unix://");
    if path.is_empty() {
        return Err("unix address must not be empty".to_string());
    }
    if path.starts_with('@') || (path.starts_with('/') && !path.ends_with('/')) {
        Ok(())
    } else {
        Err(format!("{path} is not an absolute path to a file"))
    }
}

/// `*foo.com`: valid for Istio, but it matches more than a `*.` wildcard would.
pub(super) fn is_partial_wildcard(host: &str) -> bool {
    host.contains('*') && host.len() > 1 && !host.starts_with("*.")
}

/// A DNS-1123 label: 1-63 of `[a-z0-9-]`, not starting or ending with `-`.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Collects the problems of one object.
pub(super) struct Errors {
    origin: String,
    object: String,
    pub(super) out: Vec<Problem>,
}

impl Errors {
    pub(super) fn new<T>(kind: &str, object: &Object<T>) -> Self {
        Self {
            origin: object.origin.clone(),
            object: format!("{kind} {}", object.id()),
            out: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.out
            .push(Problem::new(&self.origin, &self.object, field, message));
    }

    pub(super) fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.out
            .push(Problem::warning(&self.origin, &self.object, field, message));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::documents::parse_documents;

    /// Each case: a `spec` in YAML flow style, and the field of the expected error (None: valid).
    const CASES: &[(&str, Option<&str>)] = &[
        ("{hosts: [a.example.com], ports: [{number: 443, name: https, protocol: TLS}], resolution: DNS}", None),
        ("{hosts: [], ports: [{number: 80, name: http}]}", Some("spec.hosts")),
        ("{hosts: ['*'], ports: [{number: 80, name: http}]}", Some("spec.hosts[0]")),
        ("{hosts: ['a.*.com'], ports: [{number: 80, name: http}]}", Some("spec.hosts[0]")),
        ("{hosts: ['Bad_Host.com'], ports: [{number: 80, name: http}]}", Some("spec.hosts[0]")),
        ("{hosts: ['*.example.com'], ports: [{number: 80, name: http}], resolution: NONE}", None),
        ("{hosts: ['*.example.com'], ports: [{number: 80, name: http}], resolution: DNS}", Some("spec.hosts[0]")),
        ("{hosts: [a.example.com], ports: [{number: 0, name: x}]}", Some("spec.ports[0].number")),
        ("{hosts: [a.example.com], ports: [{number: 80, name: x, protocol: QUIC}]}", Some("spec.ports[0].protocol")),
        ("{hosts: [a.example.com], ports: [{number: 80, name: x}, {number: 80, name: y}]}", Some("spec.ports[1].number")),
        ("{hosts: [a.example.com], ports: [{number: 80, name: x}, {number: 81, name: x}]}", Some("spec.ports[1].name")),
        ("{hosts: [a.example.com], ports: [{number: 80, name: x, targetPort: 70000}]}", Some("spec.ports[0].targetPort")),
        ("{hosts: [a.example.com], ports: []}", None),
        ("{hosts: [a.example.com], addresses: [10.0.0.0/8], ports: [{number: 80, name: x}], resolution: DNS}", Some("spec.addresses[0]")),
        ("{hosts: [a.example.com], addresses: [not-an-ip], ports: [{number: 80, name: x}]}", Some("spec.addresses[0]")),
        ("{hosts: [a.example.com], addresses: ['2001:db8::/32'], ports: [{number: 80, name: x}], resolution: STATIC}", None),
        ("{hosts: [a.example.com], ports: [{number: 80, name: x}], resolution: STATIC, endpoints: [{address: lb.example.com}]}", Some("spec.endpoints[0].address")),
        ("{hosts: [a.example.com], ports: [{number: 80, name: x}], resolution: STATIC, endpoints: [{address: 198.51.100.1, ports: {y: 8080}}]}", Some("spec.endpoints[0].ports.y")),
        ("{hosts: [a.example.com], ports: [{number: 80, name: x}], resolution: NONE, endpoints: [{address: 198.51.100.1}]}", Some("spec.endpoints")),
        ("{hosts: [a.example.com], ports: [{number: 80, name: x}], resolution: DNS_ROUND_ROBIN, endpoints: [{address: a.example.net}, {address: b.example.net}]}", Some("spec.endpoints")),
        ("{hosts: [a.example.com], ports: [{number: 80, name: x}], resolution: DNS, endpoints: [{address: '*.example.net'}]}", Some("spec.endpoints[0].address")),
        ("{hosts: [a.example.com], ports: [{number: 80, name: x}], resolution: DNS, endpoints: [{address: b.example.net}]}", None),
        ("{hosts: [a.example.com], ports: [{number: 80, name: x}], resolution: STATIC, endpoints: [{address: 198.51.100.1}], workloadSelector: {labels: {app: x}}}", Some("spec.workloadSelector")),
        ("{hosts: [a.example.com], ports: [{number: 80, name: x}], resolution: STATIC, workloadSelector: {labels: {app: x}}}", None),
        ("{hosts: [a.example.com], ports: [{number: 80, name: x}], resolution: STATIC, workloadSelector: {labels: {'*': x}}}", Some("spec.workloadSelector.labels.*")),
        ("{hosts: [a.example.com], ports: [{number: 80, name: x}], exportTo: ['.', '*']}", Some("spec.exportTo")),
        ("{hosts: [a.example.com], ports: [{number: 80, name: x}], exportTo: ['~', 'ns1']}", Some("spec.exportTo")),
        ("{hosts: [a.example.com], ports: [{number: 80, name: x}], exportTo: [ns1, ns1]}", Some("spec.exportTo")),
        ("{hosts: [a.example.com], ports: [{number: 80, name: x}], exportTo: [Not_A_Namespace]}", Some("spec.exportTo")),
        ("{hosts: [a.example.com], ports: [{number: 80, name: x}], exportTo: ['.', ns1, ns2]}", None),
        ("{hosts: [a.example.com], ports: [{number: 53, name: dns, protocol: udp}], resolution: STATIC, endpoints: [{address: 'unix:///var/run/x.sock'}]}", None),
        ("{hosts: [a.example.com], ports: [{number: 53, name: dns}], resolution: STATIC, endpoints: [{address: 'unix://./rel.sock'}]}", Some("spec.endpoints[0].address")),
        ("{hosts: [a.example.com], ports: [{number: 53, name: dns}], resolution: STATIC, endpoints: [{address: 'unix:///x.sock', ports: {dns: 53}}]}", Some("spec.endpoints[0].ports")),
        ("{hosts: [a.example.com], ports: [{number: 53, name: dns}, {number: 54, name: d2}], resolution: STATIC, endpoints: [{address: 'unix:///x.sock'}]}", Some("spec.ports")),
        ("{hosts: [a.example.com], ports: [{number: 53, name: dns}], resolution: DNS, endpoints: [{address: 'unix:///x.sock'}]}", Some("spec.endpoints[0].address")),
        ("{hosts: [a.example.com], ports: [{number: 80}]}", Some("spec.ports[0].name")),
        ("{hosts: [a.example.com, b.example.com], ports: [{number: 5432, name: db, protocol: TCP}], resolution: DNS}", Some("spec.hosts")),
        ("{hosts: [a.example.com, b.example.com], ports: [{number: 5432, name: db, protocol: TCP}], resolution: NONE}", None),
        ("{hosts: [a.example.com, b.example.com], ports: [{number: 443, name: https, protocol: TLS}], resolution: DNS}", None),
        ("{hosts: ['*-foo.example.com'], ports: [{number: 80, name: http}]}", None),
        ("{hosts: [foo.123], ports: [{number: 80, name: http}]}", Some("spec.hosts[0]")),
        ("{hosts: [a.example.com], ports: [{number: 80, name: x}], exportTo: ['.', default]}", Some("spec.exportTo")),
        ("{hosts: [a.example.com], ports: [{number: 80, name: x}], exportTo: ['*', ns1]}", Some("spec.exportTo")),
    ];

    #[test]
    fn partial_wildcard_only_warns() {
        let yaml = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: w}\nspec: {hosts: ['*washingtonpost.com'], ports: [{number: 443, name: https, protocol: TLS}]}\n";
        let snap = parse_documents("w.yaml", yaml);
        let found = validate_service_entry(&snap.service_entries[0]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(!found[0].is_error());
        assert!(found[0].message.contains("partial wildcard"));
    }

    #[test]
    fn validation_table() {
        for (i, (spec, want)) in CASES.iter().enumerate() {
            let yaml = format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: case{i}}}\nspec: {spec}\n");
            let snap = parse_documents("case.yaml", &yaml);
            assert!(
                snap.problems.is_empty(),
                "case {i} did not parse: {:?}",
                snap.problems
            );
            let problems: Vec<Problem> = validate_service_entry(&snap.service_entries[0])
                .into_iter()
                .filter(Problem::is_error)
                .collect();
            match want {
                None => assert!(
                    problems.is_empty(),
                    "case {i} ({spec}) should be valid: {problems:?}"
                ),
                Some(field) => {
                    assert!(
                        problems.iter().any(|p| p.field == *field),
                        "case {i} ({spec}) wanted an error at {field}: {problems:?}"
                    );
                    let p = &problems[0];
                    assert_eq!(
                        (p.file.as_str(), p.object.as_str()),
                        (
                            "case.yaml",
                            format!("ServiceEntry default/case{i}").as_str()
                        )
                    );
                }
            }
        }
    }
}
