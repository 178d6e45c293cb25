//! The agent's handles on the kernel maps of DNS-aware enforcement (see `enforcer-ebpf`'s
//! `dns.rs`): the proxy's addresses, upstreams, slots and sockets, and the learned addresses.

use std::{net::Ipv4Addr, os::fd::AsRawFd};

use anyhow::Context as _;
use aya::maps::{Array, HashMap, MapData, SockMap};
use enforcer_common::{ipv4_mapped, DnsConfig, Learned, PolicyKey};

pub struct DnsMaps {
    pub(crate) config: Array<MapData, DnsConfig>,
    pub(crate) upstreams: HashMap<MapData, [u8; 16], u32>,
    pub(crate) upstream_addrs: Array<MapData, [u8; 16]>,
    pub(crate) slots: HashMap<MapData, u32, u32>,
    pub(crate) socks: SockMap<MapData>,
    pub(crate) skip: HashMap<MapData, u64, u32>,
    /// What `config` holds.
    pub(crate) current: DnsConfig,
}

/// The learned addresses, which the [`super::learner::Learner`] owns.
pub type LearnedMap = HashMap<MapData, PolicyKey, Learned>;

/// Reads what an earlier agent learned: it stays until it expires (or its scope stops learning).
pub fn read_learned(map: &LearnedMap) -> Vec<(PolicyKey, Learned)> {
    map.iter().filter_map(Result::ok).collect()
}

impl DnsMaps {
    /// Turns redirection on for these upstreams (index = position), at `prefix.slot :
    /// port_base + index`. The upstreams go in before the configuration that uses them.
    /// Only `agent_cgroup` may then bind or send from the prefix; unknown, nothing is guarded
    /// (the agent would lock itself out).
    pub fn enable(
        &mut self,
        prefix: Ipv4Addr,
        port_base: u16,
        upstreams: &[Ipv4Addr],
        agent_cgroup: Option<u64>,
    ) -> anyhow::Result<()> {
        let stale: Vec<[u8; 16]> = self.upstreams.keys().filter_map(Result::ok).collect();
        for key in stale {
            let _ = self.upstreams.remove(&key);
        }
        for (idx, addr) in upstreams.iter().enumerate() {
            let key = ipv4_mapped(addr.octets());
            self.upstream_addrs
                .set(idx as u32, key, 0)
                .context("writing the DNS upstreams")?;
            self.upstreams
                .insert(key, idx as u32, 0)
                .context("writing the DNS upstreams")?;
        }
        let config = DnsConfig {
            prefix4: prefix.octets(),
            port_base,
            upstreams: upstreams.len() as u16,
            // Skips an earlier agent left stay in force until the first plan says otherwise.
            flags: match self.skip.keys().next() {
                Some(_) => enforcer_common::dns_flags::SKIPS,
                None => 0,
            } | match agent_cgroup {
                Some(_) => enforcer_common::dns_flags::GUARD,
                None => 0,
            },
            pad: 0,
            agent_cgroup: agent_cgroup.unwrap_or(0),
        };
        self.write_config(config)
    }

    fn write_config(&mut self, config: DnsConfig) -> anyhow::Result<()> {
        self.config
            .set(0, config, 0)
            .context("writing the DNS proxy's configuration")?;
        self.current = config;
        Ok(())
    }

    /// The cgroups (with their subtrees) whose DNS is never redirected. Entries go in before
    /// the flag that makes the hooks look, and the flag goes off before the last entry leaves.
    pub fn set_skipped(&mut self, cgroups: &std::collections::BTreeSet<u64>) -> anyhow::Result<()> {
        let held: Vec<u64> = self.skip.keys().filter_map(Result::ok).collect();
        for id in cgroups {
            if !held.contains(id) {
                self.skip
                    .insert(id, 1, 0)
                    .with_context(|| format!("exempting cgroup {id} from DNS redirection"))?;
            }
        }
        let mut config = self.current;
        if cgroups.is_empty() {
            config.flags &= !enforcer_common::dns_flags::SKIPS;
        } else {
            config.flags |= enforcer_common::dns_flags::SKIPS;
        }
        if config != self.current {
            self.write_config(config)?;
        }
        for id in held.iter().filter(|id| !cgroups.contains(id)) {
            let _ = self.skip.remove(id);
        }
        Ok(())
    }

    pub fn set_slot(&mut self, scope: u32, slot: u8) -> anyhow::Result<()> {
        self.slots
            .insert(scope, u32::from(slot), 0)
            .with_context(|| format!("giving scope id {scope} DNS slot {slot}"))
    }

    pub fn remove_slot(&mut self, scope: u32) {
        let _ = self.slots.remove(&scope);
    }

    /// Slots an earlier agent left: taken back, so that the new agent starts clean.
    pub fn clear_slots(&mut self) {
        let stale: Vec<u32> = self.slots.keys().filter_map(Result::ok).collect();
        for scope in stale {
            let _ = self.slots.remove(&scope);
        }
    }

    pub fn add_socket(&mut self, index: u32, socket: &impl AsRawFd) -> anyhow::Result<()> {
        self.socks
            .set(index, socket, 0)
            .with_context(|| format!("putting a DNS proxy socket at {index}"))
    }

    pub fn remove_socket(&mut self, index: u32) {
        let _ = self.socks.clear_index(&index);
    }
}
