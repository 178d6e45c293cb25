//! Read-only lookups in a running agent's pinned maps, made as the kernel programs make them.

use std::{net::IpAddr, path::Path};

use aya::maps::{lpm_trie::Key, HashMap, LpmTrie, Map, MapData};
use enforcer_common::{
    map_names, proto, redirect, CgroupScope, Learned, PolicyKey, Redirect, ScopeName, GLOBAL_SCOPE,
    POLICY_KEY_HEADER_BITS,
};

use crate::{net::key_bytes, policy::L4};

/// Which kernel map entry allows a connection, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelMatch {
    Exact,
    /// A CIDR entry of the scope.
    Cidr,
    /// Loopback or `--allow-cidr`.
    Global,
    /// Learned from a DNS answer, for this many more seconds (negative: expired, refused to new
    /// connections).
    Learned {
        expires_in_s: i64,
    },
    /// A gateway redirect entry (checked first, in every mode): to the gateway, or refused.
    Redirect {
        to_gateway: bool,
    },
    None,
}

pub struct LiveMaps {
    cgroups: HashMap<MapData, u64, CgroupScope>,
    exact: HashMap<MapData, PolicyKey, u32>,
    cidr: LpmTrie<MapData, PolicyKey, u32>,
    names: HashMap<MapData, ScopeName, u32>,
    /// Absent in maps pinned by an agent that did not learn yet.
    learned: Option<HashMap<MapData, PolicyKey, Learned>>,
    /// Absent in maps pinned by an agent from before egress gateways.
    redirects: Option<HashMap<MapData, PolicyKey, Redirect>>,
}

impl LiveMaps {
    /// `None` when no agent has pinned maps under `pin_root`.
    pub fn open(pin_root: &Path) -> anyhow::Result<Option<Self>> {
        if !pin_root.join("maps").join(map_names::ALLOW_EXACT).exists() {
            return Ok(None);
        }
        Ok(Some(Self {
            cgroups: HashMap::try_from(Map::HashMap(super::open_pinned(
                pin_root,
                map_names::CGROUPS,
            )?))?,
            exact: HashMap::try_from(Map::HashMap(super::open_pinned(
                pin_root,
                map_names::ALLOW_EXACT,
            )?))?,
            cidr: LpmTrie::try_from(Map::LpmTrie(super::open_pinned(
                pin_root,
                map_names::ALLOW_CIDR,
            )?))?,
            names: HashMap::try_from(Map::HashMap(super::open_pinned(
                pin_root,
                map_names::SCOPE_NAMES,
            )?))?,
            learned: super::open_pinned(pin_root, map_names::LEARNED)
                .ok()
                .and_then(|m| HashMap::try_from(Map::HashMap(m)).ok()),
            redirects: super::open_pinned(pin_root, map_names::REDIRECTS)
                .ok()
                .and_then(|m| HashMap::try_from(Map::HashMap(m)).ok()),
        }))
    }

    pub fn scope_id(&self, scope: &str) -> Option<u32> {
        let mut key = ScopeName { name: [0; 64] };
        if scope.len() >= key.name.len() {
            return None;
        }
        key.name[..scope.len()].copy_from_slice(scope.as_bytes());
        self.names.get(&key, 0).ok()
    }

    /// The modes the kernel holds for cgroups of this scope (normally one).
    pub fn modes_of(&self, scope_id: u32) -> Vec<u32> {
        let mut modes: Vec<u32> = self
            .cgroups
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, s)| s.scope == scope_id)
            .map(|(_, s)| s.mode)
            .collect();
        modes.sort_unstable();
        modes.dedup();
        modes
    }

    /// The lookups of the connect programs, in their order.
    pub fn lookup(&self, scope_id: u32, ip: IpAddr, port: u16, l4: L4) -> KernelMatch {
        let addr = key_bytes(crate::policy::canonical_ip(ip));
        let key = PolicyKey {
            scope: scope_id,
            port,
            proto: l4.ip_proto(),
            pad: 0,
            addr,
        };
        if let Some(found) = self.redirect(&key) {
            return found;
        }
        if self.exact.get(&key, 0).is_ok() {
            return KernelMatch::Exact;
        }
        let full = POLICY_KEY_HEADER_BITS + 128;
        if self.cidr.get(&Key::new(full, key), 0).is_ok() {
            return KernelMatch::Cidr;
        }
        let global = PolicyKey {
            scope: GLOBAL_SCOPE,
            port: 0,
            proto: proto::ANY,
            pad: 0,
            addr,
        };
        if self.cidr.get(&Key::new(full, global), 0).is_ok() {
            return KernelMatch::Global;
        }
        if let Some(l) = self.learned.as_ref().and_then(|m| m.get(&key, 0).ok()) {
            let now = crate::dns::proxy::boottime_ns() as i64;
            return KernelMatch::Learned {
                expires_in_s: (l.expires_ns as i64 - now) / 1_000_000_000,
            };
        }
        KernelMatch::None
    }

    /// The port's redirect (TCP), else the address's every-port entry.
    fn redirect(&self, key: &PolicyKey) -> Option<KernelMatch> {
        let map = self.redirects.as_ref()?;
        let any = PolicyKey {
            port: 0,
            proto: proto::ANY,
            ..*key
        };
        let r = map
            .get(key, 0)
            .ok()
            .filter(|_| key.proto == proto::TCP)
            .or_else(|| map.get(&any, 0).ok())?;
        Some(KernelMatch::Redirect {
            to_gateway: r.action == redirect::TO_GATEWAY,
        })
    }
}
