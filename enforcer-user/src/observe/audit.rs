//! `enforcer audit-report`: what REGISTRY_ONLY would have refused in AUDIT scopes, grouped by
//! namespace and destination (the host when known, else the address), each with a
//! ServiceEntry that would allow it: where teams start when they move to REGISTRY_ONLY.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::records::DenyRecord;

/// Groups kept; past this, audit records are only counted in [`AuditBook::overflow`].
const GROUPS: usize = 10_000;
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
}

/// The book as it travels: a list, since JSON keys are strings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditReport {
    pub groups: Vec<(Destination, Seen)>,
    pub overflow: u64,
}

impl AuditReport {
    pub fn book(self) -> AuditBook {
        AuditBook {
            groups: self.groups.into_iter().collect(),
            overflow: self.overflow,
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
        if r.verdict != "audit" || r.dst.is_empty() || r.reason_code != "no_rule" {
            return;
        }
        let key = Destination {
            namespace: r.namespace.clone(),
            host: r.host.clone(),
            address: r.host.is_none().then(|| r.dst.clone()),
            port: r.port,
            proto: r.proto.clone(),
        };
        if !self.groups.contains_key(&key) && self.groups.len() >= GROUPS {
            self.overflow += 1;
            return;
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
        let who = r
            .pod
            .clone()
            .unwrap_or_else(|| format!("{} (pid {})", r.comm, r.pid));
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
    /// A ServiceEntry that allows this destination to its namespace, and to it only.
    pub fn service_entry(&self) -> String {
        let protocol = self.proto.to_ascii_uppercase();
        let port = format!(
            "  - number: {}\n    name: {}-{}\n    protocol: {protocol}\n",
            self.port,
            self.proto.to_ascii_lowercase(),
            self.port
        );
        let (name, hosts, rest) = match (&self.host, &self.address) {
            (Some(host), _) => (
                dns_label(host),
                host.clone(),
                "  resolution: DNS\n".to_string(),
            ),
            (None, addr) => {
                let addr = addr.clone().unwrap_or_default();
                let label = format!("ip-{}", dns_label(&addr));
                (
                    label.clone(),
                    format!("{label}.external"),
                    format!("  addresses:\n  - {addr}\n  resolution: NONE\n"),
                )
            }
        };
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}-{}\n  namespace: {}\nspec:\n  hosts:\n  - {hosts}\n  exportTo:\n  - \".\"\n  location: MESH_EXTERNAL\n  ports:\n{port}{rest}",
            self.port, self.namespace
        )
    }
}

/// A name as a DNS label: lower case, `-` for what is not a letter or digit, at most 50 bytes.
fn dns_label(name: &str) -> String {
    let label: String = name
        .trim_start_matches("*.")
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .take(50)
        .collect();
    label.trim_matches('-').to_string()
}

#[cfg(test)]
#[path = "audit_tests.rs"]
mod tests;
