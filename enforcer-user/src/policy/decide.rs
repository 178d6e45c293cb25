//! The kernel's decision, replayed on the compiled state, with the reason in words. Used for
//! refusal records and by `enforcer explain`; the kernel tests keep the two in agreement.

use std::{fmt::Write as _, net::IpAddr, sync::Arc};

use ipnet::IpNet;

use super::{canonical_ip, Desired, GatewayRoute, Origin, Rule, Via, L4};
use crate::{istio::OutboundMode, net::SocketFmt};

/// Why a connection is allowed or refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Because {
    /// A rule of the scope matches, asked for by these ServiceEntries (or built-ins).
    Rule(Rule, Vec<Arc<Origin>>),
    /// Loopback or `--allow-cidr`.
    Global(IpNet),
    /// The scope's mode is ALLOW_ANY and no rule matches.
    AllowAny,
    /// No rule matches; the text says what came closest.
    NoRule(String),
    /// No scope: the namespace is unknown to the policy, so nothing is enforced for it.
    Unenforced,
    /// A VirtualService routes it through an egress gateway: redirected there, or refused;
    /// with the sentence that says which.
    Gateway(GatewayRoute, String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// AUDIT: allowed, but reported as REGISTRY_ONLY would refuse it.
    pub audited: bool,
    pub mode: Option<OutboundMode>,
    pub because: Because,
}

/// What the kernel does for a connection from scope `scope` to `ip:port` over `l4`: the
/// scope's mode, then its exact and CIDR rules, then the global CIDRs.
pub fn decide(d: &Desired, scope: &str, ip: IpAddr, port: u16, l4: L4) -> Decision {
    let ip = canonical_ip(ip);
    let Some(policy) = d.scopes.get(scope) else {
        return Decision {
            allowed: true,
            audited: false,
            mode: None,
            because: Because::Unenforced,
        };
    };
    // As the hooks do, before the mode: redirects apply in every mode.
    let route = super::gateway::route_for(&policy.redirects, ip, port)
        .filter(|r| l4 == L4::Tcp || r.via == Via::GatewayOnly);
    if let Some(route) = route {
        let redirected = matches!(route.via, Via::Gateway(_));
        let audited = !redirected && policy.mode == OutboundMode::Audit;
        return Decision {
            allowed: redirected || audited,
            audited,
            mode: Some(policy.mode),
            because: Because::Gateway(route.clone(), gateway_sentence(route, ip, port)),
        };
    }
    let rule = policy
        .rules
        .iter()
        .filter(|(r, _)| r.l4 == l4 && r.port == port && r.net.contains(&ip))
        .max_by_key(|(r, _)| r.net.prefix_len())
        .map(|(r, o)| Because::Rule(*r, o.clone()));
    let global = d.global.iter().find(|n| n.contains(&ip)).copied();
    let matched = rule.or(global.map(Because::Global));
    let mode = policy.mode;
    let (allowed, audited, because) = match (matched, mode) {
        (Some(b), _) => (true, false, b),
        (None, OutboundMode::AllowAny) => (true, false, Because::AllowAny),
        (None, OutboundMode::Audit) => {
            (true, true, Because::NoRule(refusal(d, scope, ip, port, l4)))
        }
        (None, OutboundMode::RegistryOnly) => (
            false,
            false,
            Because::NoRule(refusal(d, scope, ip, port, l4)),
        ),
    };
    Decision {
        allowed,
        audited,
        mode: Some(mode),
        because,
    }
}

fn gateway_sentence(route: &GatewayRoute, ip: IpAddr, port: u16) -> String {
    match &route.via {
        Via::Gateway(targets) => {
            let to: Vec<String> = targets.iter().map(ToString::to_string).collect();
            format!(
                "redirected to egress gateway {} ({}) by VirtualService {}, for {}",
                route.gateway,
                to.join(", "),
                route.virtual_service,
                route.host
            )
        }
        _ => route.refusal(ip, port),
    }
}

/// Why no rule of `scope` allows `ip:port/l4`: which declared hosts have that address, and
/// what keeps them out (exportTo, the Sidecar's imports, or other ports).
pub fn refusal(d: &Desired, scope: &str, ip: IpAddr, port: u16, l4: L4) -> String {
    let ip = canonical_ip(ip);
    let policy = d.scopes.get(scope);
    let namespace = policy.map_or(scope, |p| p.namespace.as_str());
    let mut reason = format!(
        "no ServiceEntry visible to namespace {namespace} allows {}/{l4}",
        SocketFmt(ip, port)
    );
    if let Some(sidecar) = policy.and_then(|p| p.sidecar.as_deref()) {
        let _ = write!(reason, " (Sidecar {sidecar} in force)");
    }
    for r in d.hosts_by_ip.get(&ip).into_iter().flatten() {
        let visible = r
            .visible_to
            .as_ref()
            .is_none_or(|set| set.contains(namespace));
        let se_ns = r.service_entry.split_once('/').map_or("", |(ns, _)| ns);
        let imports = policy.and_then(|p| p.imports.as_ref());
        if !visible {
            let to: Vec<&str> = r.visible_to.iter().flatten().map(String::as_str).collect();
            let _ = write!(
                reason,
                "; {} is declared by ServiceEntry {}, exported only to [{}]",
                r.host,
                r.service_entry,
                to.join(", ")
            );
        } else if imports.is_some_and(|i| !i.imports(se_ns, &r.host, port)) {
            let _ = write!(
                reason,
                "; ServiceEntry {} declares {}, but the Sidecar's egress does not import {se_ns}/{} on port {port}",
                r.service_entry, r.host, r.host
            );
        } else {
            let _ = write!(
                reason,
                "; ServiceEntry {} declares {} on other ports or protocols",
                r.service_entry, r.host
            );
        }
    }
    reason
}

impl Decision {
    /// One line: the verdict and its reason.
    pub fn describe(&self) -> String {
        let verdict = match (self.allowed, self.audited) {
            (true, false) => "ALLOWED",
            (true, true) => "ALLOWED (AUDIT: reported as REGISTRY_ONLY would refuse it)",
            (false, _) => "REFUSED",
        };
        let why = match &self.because {
            Because::Rule(rule, origins) => {
                let by: Vec<String> = origins
                    .iter()
                    .map(|o| match &o.host {
                        _ if o.service_entry.starts_with('(') => o.service_entry.clone(),
                        Some(h) => format!("ServiceEntry {} (host {h})", o.service_entry),
                        None => format!("ServiceEntry {}", o.service_entry),
                    })
                    .collect();
                format!("by {} with rule {rule}", by.join(" and "))
            }
            Because::Global(net) => format!("always allowed ({net}: loopback or --allow-cidr)"),
            Because::AllowAny => "mode ALLOW_ANY; no ServiceEntry needed".to_string(),
            Because::NoRule(reason) => reason.clone(),
            Because::Unenforced => {
                "the namespace is not known to the policy; nothing is enforced for it".to_string()
            }
            Because::Gateway(_, sentence) => sentence.clone(),
        };
        format!("{verdict}: {why}")
    }
}

/// The scope a workload gets, in a line: `namespace shop, workload app=web: mode REGISTRY_ONLY, Sidecar shop/web`.
pub fn describe_scope(
    d: &Desired,
    ns: &str,
    labels: &std::collections::BTreeMap<String, String>,
    scope: &str,
) -> String {
    let workload = if labels.is_empty() {
        String::new()
    } else {
        format!(", workload {}", crate::cgroup::encode_labels(labels))
    };
    match d.scopes.get(scope) {
        Some(p) => format!(
            "namespace {ns}{workload}: mode {}, {}",
            p.mode,
            match (&p.gateway, &p.sidecar) {
                (Some(g), _) => format!("workloads of {g}"),
                (None, Some(s)) => format!("Sidecar {s}"),
                (None, None) => "no Sidecar".to_string(),
            }
        ),
        None => format!("namespace {ns}{workload}: not known to the policy"),
    }
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
