//! A Gateway's servers, as Istio's `validateServer` and the functions it calls check them:
//! port, bind, hosts, and TLS settings against the protocol.

use std::{collections::BTreeSet, net::IpAddr};

use super::{
    validate::{check_unix_address, is_dns1123_label, is_partial_wildcard, Errors},
    validate_routing::{is_set, wildcard_domain},
};
use crate::istio::{
    routing::{Server, ServerTls},
    Port,
};

/// `ServerTLSSettings.TLSmode`; unset reads as the first, PASSTHROUGH.
const SERVER_TLS_MODES: [&str; 6] = [
    "PASSTHROUGH",
    "SIMPLE",
    "MUTUAL",
    "AUTO_PASSTHROUGH",
    "ISTIO_MUTUAL",
    "OPTIONAL_MUTUAL",
];

/// Istio's `validateServer`.
pub(super) fn check_server(server: &Server, field: &str, errs: &mut Errors) {
    if server.hosts.is_empty() {
        errs.push(
            format!("{field}.hosts"),
            "server config must contain at least one host",
        );
    }
    for (j, host) in server.hosts.iter().enumerate() {
        if let Err(msg) = check_server_host(host) {
            errs.push(format!("{field}.hosts[{j}]"), msg);
        }
    }
    let bind = server.bind.as_deref().unwrap_or_default();
    check_server_bind(server.port.as_ref(), bind, field, errs);
    if let Some(tls) = &server.tls {
        check_server_tls(tls, &format!("{field}.tls"), errs);
    }
    let Some(port) = &server.port else {
        errs.push(format!("{field}.port"), "port is required");
        return;
    };
    if let Some(protocol) = check_server_port(port, bind, field, errs) {
        check_protocol_tls(server, protocol, field, errs);
    }
}

/// Istio's `protocol.Parse`: `None` for what it calls UnsupportedProtocol, the empty name too.
fn protocol(name: &str) -> Option<&'static str> {
    const KNOWN: [&str; 12] = [
        "TCP",
        "UDP",
        "GRPC",
        "GRPC-WEB",
        "HTTP",
        "HTTP_PROXY",
        "HTTP2",
        "HTTPS",
        "TLS",
        "MONGO",
        "REDIS",
        "MYSQL",
    ];
    let upper = name.to_ascii_uppercase();
    KNOWN.into_iter().find(|p| *p == upper)
}

fn is_http(protocol: &str) -> bool {
    matches!(
        protocol,
        "HTTP" | "HTTP2" | "HTTP_PROXY" | "GRPC" | "GRPC-WEB"
    )
}

fn is_tls(protocol: &str) -> bool {
    matches!(protocol, "HTTPS" | "TLS")
}

/// Istio's `validateServerPort`; the protocol when the whole port is valid, as the TLS checks
/// that follow need.
fn check_server_port(
    port: &Port,
    bind: &str,
    field: &str,
    errs: &mut Errors,
) -> Option<&'static str> {
    let before = errs.out.len();
    let name = port.protocol.as_deref().unwrap_or_default();
    let protocol = protocol(name);
    if protocol.is_none() {
        errs.push(
            format!("{field}.port.protocol"),
            format!("invalid protocol {name:?}, supported protocols are HTTP, HTTPS, HTTP2, GRPC, GRPC-WEB, TLS, MONGO, REDIS, MYSQL, TCP"),
        );
    }
    // Port 0 is how a unix socket server says it has no port.
    if (port.number > 0 || !bind.starts_with("unix://")) && !(1..=65535).contains(&port.number) {
        errs.push(
            format!("{field}.port.number"),
            format!("port number {} must be in the range 1..65535", port.number),
        );
    }
    if port.target_port.is_some_and(|t| t > 0) {
        errs.push(
            format!("{field}.port.targetPort"),
            "targetPort has no impact on Gateways",
        );
    }
    if port.name.as_deref().unwrap_or_default().is_empty() {
        errs.push(format!("{field}.port.name"), "port name must be set");
    }
    protocol.filter(|_| errs.out.len() == before)
}

/// Istio's `validateServerBind`: a unix socket (then port 0) or an IP address.
fn check_server_bind(port: Option<&Port>, bind: &str, field: &str, errs: &mut Errors) {
    if bind.starts_with("unix://") {
        if let Err(msg) = check_unix_address(bind) {
            errs.push(format!("{field}.bind"), msg);
        }
        if port.is_some_and(|p| p.number != 0) {
            errs.push(
                format!("{field}.port.number"),
                "port number must be 0 for unix domain socket",
            );
        }
    } else if !bind.is_empty() && bind.parse::<IpAddr>().is_err() {
        errs.push(format!("{field}.bind"), format!("{bind} is not a valid IP"));
    }
}

/// Istio's `ValidateNamespaceSlashWildcardHostname` for a Gateway: `[namespace/]dnsName`, the
/// namespace `*`, `.` or a name; the dnsName `*`, an FQDN that may start with `*.`, or an IP.
fn check_server_host(host: &str) -> Result<(), String> {
    let name = match host.split_once('/') {
        None => host,
        Some((ns, name)) if ns.is_empty() || name.is_empty() => {
            return Err("config namespace and dnsName in host entry cannot be empty".to_string())
        }
        Some((ns, _)) if !(ns == "*" || ns == "." || is_dns1123_label(ns)) => {
            return Err(format!("invalid namespace value {ns:?} in gateway"))
        }
        Some((_, name)) => name,
    };
    if name != "*" && !name.contains('.') {
        return Err(format!("{name:?}: short names (non FQDN) are not allowed"));
    }
    if is_partial_wildcard(name) {
        return Err(format!("partial wildcard {name:?} not allowed"));
    }
    if name.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    wildcard_domain(name)
}

/// Istio's `validateTLSOptions` for the typed fields (not ciphers, versions or CRLs).
fn check_server_tls(tls: &ServerTls, field: &str, errs: &mut Errors) {
    let mode = tls.mode.as_deref().unwrap_or("PASSTHROUGH");
    if !SERVER_TLS_MODES.contains(&mode) {
        errs.push(
            format!("{field}.mode"),
            format!("unknown TLS mode {mode:?}; expected one of {SERVER_TLS_MODES:?}"),
        );
        return;
    }
    let files = [
        ("serverCertificate", &tls.server_certificate),
        ("privateKey", &tls.private_key),
        ("caCertificates", &tls.ca_certificates),
        ("credentialName", &tls.credential_name),
    ];
    let set = |name: &str| files.iter().any(|(n, v)| *n == name && is_set(v));
    match mode {
        "ISTIO_MUTUAL" => {
            for (name, _) in files.iter().filter(|(n, _)| set(n)) {
                errs.push(
                    format!("{field}.{name}"),
                    format!("ISTIO_MUTUAL TLS cannot have associated {name}"),
                );
            }
        }
        "PASSTHROUGH" | "AUTO_PASSTHROUGH" if files.iter().any(|(n, _)| set(n)) => errs.warn(
            field,
            format!("{mode} mode does not use certificates, they will be ignored"),
        ),
        // With a credentialName the certificates come from a secret.
        "SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL" if set("credentialName") => {}
        "SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL" => {
            let kind = if mode == "SIMPLE" { "SIMPLE" } else { "MUTUAL" };
            let mut needs = vec![
                ("serverCertificate", "a server certificate"),
                ("privateKey", "a private key"),
            ];
            if kind == "MUTUAL" {
                needs.push(("caCertificates", "a client CA bundle"));
            }
            for (name, what) in needs.into_iter().filter(|(n, _)| !set(n)) {
                errs.push(
                    format!("{field}.{name}"),
                    format!("{kind} TLS requires {what}"),
                );
            }
        }
        _ => {}
    }
}

/// HTTPS and TLS servers need TLS settings. A plain HTTP server may carry only an
/// `httpsRedirect` (a passthrough mode without certificates), any other server none.
fn check_protocol_tls(server: &Server, protocol: &str, field: &str, errs: &mut Errors) {
    let tls_field = format!("{field}.tls");
    match &server.tls {
        None if is_tls(protocol) => errs.push(
            tls_field,
            "server must have TLS settings for HTTPS/TLS protocols",
        ),
        Some(tls) if !is_tls(protocol) && is_http(protocol) => {
            let mode = tls.mode.as_deref().unwrap_or("PASSTHROUGH");
            let certificates = is_set(&tls.server_certificate)
                || is_set(&tls.private_key)
                || is_set(&tls.ca_certificates);
            if !matches!(mode, "PASSTHROUGH" | "AUTO_PASSTHROUGH") || certificates {
                errs.push(
                    tls_field,
                    "server cannot have TLS settings for plain text HTTP ports",
                );
            } else if tls.mode.is_some() {
                // Istio cannot tell an explicit PASSTHROUGH from the unset enum, and accepts it.
                errs.warn(
                    format!("{tls_field}.mode"),
                    format!("{mode} has no effect on a plain text {protocol} server; only tls.httpsRedirect is used"),
                );
            }
        }
        Some(_) if !is_tls(protocol) => errs.push(
            tls_field,
            "server cannot have TLS settings for non HTTPS/TLS ports",
        ),
        _ => {}
    }
    if !is_http(protocol) && server.tls.as_ref().and_then(|t| t.https_redirect) == Some(true) {
        errs.warn(
            format!("{field}.tls.httpsRedirect"),
            "tls.httpsRedirect should only be used with http servers",
        );
    }
}

pub(super) fn check_server_port_names(servers: &[Server], errs: &mut Errors) {
    let mut seen = BTreeSet::new();
    for (i, server) in servers.iter().enumerate() {
        let Some(port) = &server.port else { continue };
        let name = port.name.as_deref().unwrap_or_default();
        if !seen.insert(name) {
            errs.push(
                format!("spec.servers[{i}].port.name"),
                format!("port names in servers must be unique: duplicate name {name}"),
            );
        }
    }
}
