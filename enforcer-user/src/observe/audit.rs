//! `enforcer audit-report`: what REGISTRY_ONLY would have refused in AUDIT scopes, grouped by
//! namespace and destination (the host when known, else the address), each with a
//! ServiceEntry that would allow it: where teams start when they move to REGISTRY_ONLY.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::records::DenyRecord;

/// Groups kept; past this, audit records are only counted in [`AuditBook::overflow`].
const GROUPS: usize = 10_000;
/// Groups one namespace may hold, so that one namespace cannot crowd out the others.
const GROUPS_PER_NAMESPACE: usize = 1_000;
/// Addresses and pods kept per group, to name examples, not to inventory.
const EXAMPLES: usize = 8;

/// One destination a namespace would have been refused.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Destination {
    pub namespace: String,
    /// The host the address was known for; `None` for an address no name was known for.
    pub host: Option<String>,
    /// The address, when no host is known (with a host, its addresses are in the group).
    pub address: Option<String>,
    pub port: u16,
    pub proto: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub count: u64,
    pub first_unix_ms: u128,
    pub last_unix_ms: u128,
    pub addresses: BTreeSet<String>,
    /// Pods (or, without a pod name, processes) that connected.
    pub pods: BTreeSet<String>,
}

/// Audit records, grouped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditBook {
    pub groups: BTreeMap<Destination, Seen>,
    /// Records that found the book full.
    pub overflow: u64,
    /// Groups per namespace.
    per_namespace: BTreeMap<String, usize>,
}

/// The book as it travels: a list, since JSON keys are strings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditReport {
    pub groups: Vec<(Destination, Seen)>,
    pub overflow: u64,
}

impl AuditReport {
    pub fn book(self) -> AuditBook {
        let groups: BTreeMap<Destination, Seen> = self.groups.into_iter().collect();
        let mut per_namespace = BTreeMap::new();
        for d in groups.keys() {
            *per_namespace.entry(d.namespace.clone()).or_default() += 1;
        }
        AuditBook {
            groups,
            overflow: self.overflow,
            per_namespace,
        }
    }
}

impl AuditBook {
    pub fn report(self) -> AuditReport {
        AuditReport {
            groups: self.groups.into_iter().collect(),
            overflow: self.overflow,
        }
    }

    /// Counts an `audit` record; other verdicts, and records without a destination, are not
    /// what REGISTRY_ONLY would refuse by destination.
    pub fn add(&mut self, r: &DenyRecord) {
        // A ServiceEntry's ports are TCP or UDP: other protocols (ICMP on a pod's veth) are
        // allowed by no entry.
        if r.verdict != "audit"
            || r.reason_code != "no_rule"
            || r.dst.parse::<std::net::IpAddr>().is_err()
            || !matches!(r.proto.as_str(), "tcp" | "udp")
        {
            return;
        }
        let key = Destination {
            namespace: r.namespace.clone(),
            host: r.host.clone(),
            address: r.host.is_none().then(|| r.dst.clone()),
            port: r.port,
            proto: r.proto.clone(),
        };
        if !self.groups.contains_key(&key) {
            let in_namespace = self.per_namespace.entry(key.namespace.clone()).or_default();
            if self.groups.len() >= GROUPS || *in_namespace >= GROUPS_PER_NAMESPACE {
                self.overflow += 1;
                return;
            }
            *in_namespace += 1;
        }
        let seen = self.groups.entry(key).or_default();
        if seen.count == 0 {
            seen.first_unix_ms = r.time_unix_ms;
        }
        seen.count += 1;
        seen.last_unix_ms = seen.last_unix_ms.max(r.time_unix_ms);
        if seen.addresses.len() < EXAMPLES {
            seen.addresses.insert(r.dst.clone());
        }
        // TC and revocation records name no process: their veth or cgroup, then.
        let who = match (&r.pod, r.pid) {
            (Some(pod), _) => pod.clone(),
            (None, 0) => r.cgroup.clone(),
            (None, pid) => format!("{} (pid {pid})", r.comm),
        };
        if seen.pods.len() < EXAMPLES {
            seen.pods.insert(who);
        }
    }

    /// The groups of `namespace` (all with `None`), the most seen first.
    pub fn rows(&self, namespace: Option<&str>) -> Vec<(&Destination, &Seen)> {
        let mut rows: Vec<_> = self
            .groups
            .iter()
            .filter(|(d, _)| namespace.is_none_or(|ns| d.namespace == ns))
            .collect();
        rows.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
        rows
    }
}

impl Destination {
    /// A ServiceEntry that allows this destination to its namespace, and only the addresses
    /// seen: `resolution: NONE` with `addresses`, whatever the host. A host's name comes from
    /// whichever ServiceEntry declares its address, perhaps another tenant's: following that
    /// name's DNS answers would allow what its owner points it at, so that is left to the
    /// reader to choose (the comment says how).
    pub fn service_entry(&self, seen: &Seen) -> anyhow::Result<String> {
        let label = |s: &str| dns_label(s).unwrap_or_else(|| "egress".to_string());
        let (name, host) = match &self.host {
            Some(host) if valid_host(host) => (label(host), host.clone()),
            _ => {
                let ip = self.address.as_deref().unwrap_or_default();
                let name = format!("ip-{}", label(ip));
                (name.clone(), format!("{name}.external"))
            }
        };
        let addresses: Vec<&String> = match &self.address {
            Some(addr) => vec![addr],
            None => seen.addresses.iter().collect(),
        };
        let protocol = self.proto.to_ascii_uppercase();
        let entry = serde_json::json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {
                "name": format!("{}-{}", name.chars().take(50).collect::<String>().trim_end_matches('-'), self.port),
                "namespace": self.namespace,
            },
            "spec": {
                "hosts": [host],
                "addresses": addresses,
                "exportTo": ["."],
                "location": "MESH_EXTERNAL",
                "ports": [{
                    "number": self.port,
                    "name": format!("{}-{}", self.proto.to_ascii_lowercase(), self.port),
                    "protocol": protocol,
                }],
                "resolution": "NONE",
            },
        });
        let comment = if self.host.is_some() {
            format!(
                "# The addresses {} was seen at (up to {EXAMPLES}). To follow its DNS answers\n# instead, drop `addresses` and set `resolution: DNS`, if you trust whoever\n# controls that name.\n",
                host
            )
        } else {
            String::new()
        };
        Ok(format!("{comment}{}", serde_yaml::to_string(&entry)?))
    }
}

/// A host name as Istio takes one: letters, digits, `-` and `.`, and no wildcard (a
/// ServiceEntry for `*.x` would allow more than was seen).
fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// A name as a DNS label: lower case, `-` for what is not a letter or digit; `None` if
/// nothing is left.
fn dns_label(name: &str) -> Option<String> {
    let label: String = name
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    let label = label.trim_matches('-').to_string();
    (!label.is_empty()).then_some(label)
}

#[cfg(test)]
#[path = "audit_tests.rs"]
mod tests;
