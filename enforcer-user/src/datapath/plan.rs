//! The exact map contents for a desired state: pure, so it is tested without a kernel.

use std::collections::{BTreeMap, BTreeSet};

use std::net::SocketAddr;

use enforcer_common::{
    mode, proto, redirect, CgroupScope, PolicyKey, Redirect, FAILED_SCOPE, GLOBAL_SCOPE,
    MAX_REDIRECT_TARGETS, POLICY_KEY_HEADER_BITS,
};
use ipnet::IpNet;

use crate::{
    cgroup::Assignment,
    istio::OutboundMode,
    k8s::UNENFORCED,
    net::{key_bytes, key_nets, key_prefix_len},
    policy::{Desired, RedirectKey, Via},
};

/// What the kernel maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapPlan {
    pub cgroups: BTreeMap<u64, CgroupScope>,
    /// Local pods' addresses (16-byte key form), for the TC program.
    pub pods: BTreeMap<[u8; 16], CgroupScope>,
    /// Cgroups that claim their descendants (Kubernetes pods, the kubelet's root; local
    /// namespace and workload cgroups, `--cgroup` mappings).
    pub trees: BTreeMap<u64, CgroupScope>,
    pub exact: BTreeSet<PolicyKey>,
    /// Trie entries: (prefix length of the whole key, key).
    pub cidr: BTreeSet<(u32, PolicyKey)>,
    /// Gateway-routed destinations (see `policy::gateway`).
    pub redirects: BTreeMap<PolicyKey, Redirect>,
}

/// What workloads get whose scope has no id: no rule names [`FAILED_SCOPE`].
pub const FAILED: CgroupScope = CgroupScope {
    scope: FAILED_SCOPE,
    mode: mode::REGISTRY_ONLY,
};

impl MapPlan {
    /// Scope ids that some entry uses: they cannot be given to another scope yet.
    pub fn scope_ids_in_use(&self) -> BTreeSet<u32> {
        self.exact
            .iter()
            .map(|k| k.scope)
            .chain(self.cidr.iter().map(|(_, k)| k.scope))
            .chain(self.cgroups.values().map(|s| s.scope))
            .chain(self.trees.values().map(|s| s.scope))
            .chain(self.pods.values().map(|s| s.scope))
            .chain(self.redirects.keys().map(|k| k.scope))
            .collect()
    }

    /// Whether the allow maps of this plan let `key` pass, exactly as the kernel programs look
    /// it up: an `ALLOW_EXACT` key, else an `ALLOW_CIDR` entry whose prefix covers the key,
    /// else a [`GLOBAL_SCOPE`] CIDR that covers the address (any port, any protocol).
    pub fn allows(&self, key: &PolicyKey) -> bool {
        if self.exact.contains(key) {
            return true;
        }
        let global = PolicyKey {
            scope: GLOBAL_SCOPE,
            port: 0,
            proto: proto::ANY,
            pad: 0,
            addr: key.addr,
        };
        let (bits, global_bits) = (trie_bits(key), trie_bits(&global));
        self.cidr.iter().any(|(len, entry)| {
            let entry = trie_bits(entry);
            prefix_matches(&entry, &bits, *len) || prefix_matches(&entry, &global_bits, *len)
        })
    }
}

/// A key as the LPM trie compares it: its bytes in memory order, the header first.
fn trie_bits(key: &PolicyKey) -> [u8; 24] {
    let mut out = [0; 24];
    out[0..4].copy_from_slice(&key.scope.to_ne_bytes());
    out[4..6].copy_from_slice(&key.port.to_ne_bytes());
    out[6] = key.proto;
    out[7] = key.pad;
    out[8..].copy_from_slice(&key.addr);
    out
}

/// Whether the first `len` bits of `entry` and `key` agree (an LPM trie match).
fn prefix_matches(entry: &[u8; 24], key: &[u8; 24], len: u32) -> bool {
    let len = len.min(24 * 8) as usize;
    let (whole, rest) = (len / 8, len % 8);
    if entry[..whole] != key[..whole] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        entry[whole] & mask == key[whole] & mask
    }
}

pub fn mode_value(mode: OutboundMode) -> u32 {
    match mode {
        OutboundMode::AllowAny => mode::ALLOW_ANY,
        OutboundMode::RegistryOnly => mode::REGISTRY_ONLY,
        OutboundMode::Audit => mode::AUDIT,
    }
}

/// Where a workload's scope has no id in `scope_ids`, the workload gets [`FAILED`].
/// A pod: its address and the workload it is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodAssignment {
    pub ip: std::net::IpAddr,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// Its name (a Kubernetes pod's, a local pod's network namespace): records name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// Who runs where: cgroups (each alone, or with their subtree) and pod addresses.
#[derive(Clone, Copy)]
pub struct Workloads<'a> {
    pub cgroups: &'a BTreeMap<u64, Assignment>,
    /// Cgroups whose descendants belong to the same workload (Kubernetes pods; local
    /// namespaces and `--cgroup` mappings). An exact entry in `cgroups` wins over a tree.
    pub trees: &'a BTreeMap<u64, Assignment>,
    pub pods: &'a [PodAssignment],
    /// The agent's own cgroup: never enforced, whatever claims its ancestors.
    pub agent: Option<u64>,
}

pub fn build(
    desired: &Desired,
    workloads: Workloads<'_>,
    scope_ids: &BTreeMap<String, u32>,
) -> MapPlan {
    let Workloads {
        cgroups,
        trees,
        pods,
        agent,
    } = workloads;
    let mut plan = MapPlan::default();
    // A scope costs map entries only while a workload of it runs on this node: every node sees
    // every namespace, but holds the rules of its own workloads only. Rules go in before
    // cgroups, so a new workload never runs ahead of its scope's rules.
    let used: BTreeSet<&str> = cgroups
        .values()
        .chain(trees.values())
        .map(|a| (&a.namespace, &a.labels))
        .chain(pods.iter().map(|p| (&p.namespace, &p.labels)))
        .filter_map(|(ns, labels)| desired.scope_for(ns, labels))
        .collect();
    for (name, policy) in &desired.scopes {
        let Some(&scope) = scope_ids.get(name) else {
            continue;
        };
        if !used.contains(name.as_str()) {
            continue;
        }
        for rule in policy.rules.keys() {
            let key = |net: &IpNet| PolicyKey {
                scope,
                port: rule.port,
                proto: rule.l4.ip_proto(),
                pad: 0,
                addr: key_bytes(net.network()),
            };
            if rule.is_exact() {
                plan.exact.insert(key(&rule.net));
                continue;
            }
            for net in key_nets(rule.net) {
                plan.cidr.insert((
                    POLICY_KEY_HEADER_BITS + u32::from(key_prefix_len(&net)),
                    key(&net),
                ));
            }
        }
        for (key, route) in &policy.redirects {
            let (key, value) = redirect_entry(scope, key, &route.via);
            // Without its redirect (a failed insert), a routed destination is refused, not
            // reached directly through the entry that declares it.
            plan.exact.remove(&key);
            plan.redirects.insert(key, value);
        }
    }
    for net in desired.global.iter().flat_map(|&net| key_nets(net)) {
        let key = PolicyKey {
            scope: GLOBAL_SCOPE,
            port: 0,
            proto: proto::ANY,
            pad: 0,
            addr: key_bytes(net.network()),
        };
        plan.cidr.insert((
            POLICY_KEY_HEADER_BITS + u32::from(key_prefix_len(&net)),
            key,
        ));
    }
    let scope_of = |namespace: &str, labels: &BTreeMap<String, String>| {
        let name = desired.scope_for(namespace, labels)?;
        let policy = desired.scopes.get(name)?;
        Some(match scope_ids.get(name) {
            Some(&scope) => CgroupScope {
                scope,
                mode: mode_value(policy.mode),
            },
            // The scope-name map is full: refused everything, never unenforced.
            None => FAILED,
        })
    };
    plan.cgroups = cgroups
        .iter()
        .filter_map(|(&id, a)| Some((id, scope_of(&a.namespace, &a.labels)?)))
        .collect();
    plan.trees = trees
        .iter()
        .filter_map(|(&id, a)| Some((id, scope_of(&a.namespace, &a.labels)?)))
        .collect();
    plan.pods = pods
        .iter()
        .filter_map(|p| Some((key_bytes(p.ip), scope_of(&p.namespace, &p.labels)?)))
        .collect();
    if let (Some(id), Some(scope)) = (agent, agent_scope(scope_ids)) {
        plan.cgroups.insert(id, scope);
    }
    plan
}

/// The kernel's entry for one gateway-routed destination. Targets are of the destination's
/// family where the gateway has such addresses; an IPv6 destination falls back to IPv4 ones
/// (written IPv4-mapped), an IPv4 one cannot, and is refused instead of going direct.
pub fn redirect_entry(scope: u32, key: &RedirectKey, via: &Via) -> (PolicyKey, Redirect) {
    let (port, proto) = match key.port {
        0 => (0, proto::ANY),
        p => (p, proto::TCP),
    };
    let pkey = PolicyKey {
        scope,
        port,
        proto,
        pad: 0,
        addr: key_bytes(key.ip),
    };
    let mut value = Redirect {
        addrs: [[0; 16]; MAX_REDIRECT_TARGETS],
        ports: [0; MAX_REDIRECT_TARGETS],
        count: 0,
        action: redirect::REFUSE,
    };
    match via {
        Via::GatewayOnly => value.action = redirect::GATEWAY_ONLY,
        Via::Refused(_) => {}
        Via::Gateway(targets) => {
            let same: Vec<&SocketAddr> = targets
                .iter()
                .filter(|t| t.is_ipv4() == key.ip.is_ipv4())
                .collect();
            let usable = if same.is_empty() && key.ip.is_ipv6() {
                targets.iter().collect()
            } else {
                same
            };
            for (i, t) in usable.iter().take(MAX_REDIRECT_TARGETS).enumerate() {
                value.addrs[i] = key_bytes(t.ip());
                value.ports[i] = t.port();
                value.count = i as u32 + 1;
            }
            if value.count > 0 {
                value.action = redirect::TO_GATEWAY;
            }
        }
    }
    (pkey, value)
}

/// The scope the agent's own cgroup is exempted with: `enforcer.unenforced`, allowed. `None`
/// until that scope has an id.
pub fn agent_scope(scope_ids: &BTreeMap<String, u32>) -> Option<CgroupScope> {
    Some(CgroupScope {
        scope: *scope_ids.get(UNENFORCED)?,
        mode: mode::ALLOW_ANY,
    })
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
