//! The only owner of the kernel side: loads the programs, pins programs, links and maps under
//! bpffs, attaches to the cgroup v2 root, and applies map diffs.
//!
//! Restart and upgrade never open a gap: maps are pinned and reused, the new programs are attached
//! beside the old ones (multi-attach), and only then are the old links unpinned and detached.

pub mod bpffs;
mod cgroup_links;
pub mod inspect;
mod layout;
mod migrate;
pub mod plan;
pub mod scope_ids;
mod sync;
mod sys;
mod tc_links;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _};
use aya::{
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, SockMap},
    programs::links::PinnedLink,
    Ebpf, EbpfLoader,
};
use cgroup_links::attach_cgroup_programs;
use enforcer_common::{
    map_names, CgroupScope, FlowKey, FlowVerdict, PolicyKey, ScopeName, VethPod,
};

pub use plan::MapPlan;

use crate::dns::maps::{DnsMaps, LearnedMap};
pub use sync::{ApplyError, ApplyReport};
pub use tc_links::sweep_stale_tc;

/// The kernel object, built by `build.rs` from `enforcer-ebpf`.
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("ENFORCER_BPF_OBJECT"));

#[derive(Clone, Debug)]
pub struct Options {
    /// Directory under bpffs that holds `maps/`, `programs/` and `links/`.
    pub pin_root: PathBuf,
    pub cgroup_root: PathBuf,
    pub max_exact: u32,
    pub max_cidr: u32,
    /// Capacity of the scope-name map (namespaces and selecting Sidecars in use at once).
    pub max_scopes: u32,
    /// Capacity of the map of addresses learned from DNS answers.
    pub max_learned: u32,
}

pub struct Datapath {
    // Keeps the programs loaded for the lifetime of the agent; the pins keep them after it.
    _ebpf: Ebpf,
    maps: sync::Maps,
    /// Pod veths' own addresses, written as the TC programs go on and off each veth.
    veths: HashMap<MapData, u32, VethPod>,
    /// The TC judge's flow verdicts, replies and revocations, purged of a pod's entries when
    /// it goes.
    flows: HashMap<MapData, FlowKey, FlowVerdict>,
    replies: HashMap<MapData, FlowKey, u32>,
    revoked: HashMap<MapData, FlowKey, u32>,
    /// The kernel's per-CPU counters ([`enforcer_common::counter`]).
    counters: PerCpuArray<MapData, u64>,
    applied: MapPlan,
    scope_ids: BTreeMap<String, u32>,
    max_scopes: usize,
    /// Set while new maps are being filled: the programs are not attached yet.
    migrating: Option<Options>,
    /// The DNS proxy's maps, until the proxy takes them.
    dns: Option<(DnsMaps, LearnedMap)>,
}

impl Datapath {
    /// Loads, pins and attaches, adopting whatever an earlier agent left pinned. Returns the
    /// ring buffer of refusals as well.
    ///
    /// Pinned maps of another shape (an upgrade that changed a layout, a changed capacity) are
    /// not adopted: new maps are made beside them and the programs are attached only by
    /// [`Datapath::finish_migration`], once the first plan is in (see `migrate`).
    pub fn open(opts: &Options) -> anyhow::Result<(Self, RingBuf<MapData>)> {
        bpffs::ensure_mounted(&opts.pin_root)?;
        migrate::recover(&opts.pin_root)?;
        let maps_dir = opts.pin_root.join("maps");
        for dir in [
            &maps_dir,
            &opts.pin_root.join("programs"),
            &opts.pin_root.join("links"),
        ] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let capacities = [
            (map_names::ALLOW_EXACT, opts.max_exact),
            (map_names::ALLOW_CIDR, opts.max_cidr),
            (map_names::SCOPE_NAMES, opts.max_scopes),
            (map_names::LEARNED, opts.max_learned),
        ];
        let shapes = layout::expected(BPF_OBJECT, &capacities)?;
        let stale = layout::mismatches(&shapes, &maps_dir)?;
        let load_dir = if stale.is_empty() {
            maps_dir
        } else {
            for line in &stale {
                log::warn!("pinned map {line}");
            }
            log::warn!("migrating to new maps; the old programs enforce the old maps until the new ones hold the first plan");
            migrate::stage(&opts.pin_root)?
        };
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&load_dir);
        for (name, capacity) in capacities {
            loader.map_max_entries(name, capacity);
        }
        let mut ebpf = loader
            .load(BPF_OBJECT)
            .context("loading the BPF object (is this root, with BPF enabled?)")?;
        if stale.is_empty() {
            attach_cgroup_programs(&mut ebpf, opts)?;
        }

        let maps = sync::Maps {
            cgroups: HashMap::<_, u64, CgroupScope>::try_from(take(
                &mut ebpf,
                map_names::CGROUPS,
            )?)?,
            exact: HashMap::<_, PolicyKey, u32>::try_from(take(
                &mut ebpf,
                map_names::ALLOW_EXACT,
            )?)?,
            cidr: LpmTrie::<_, PolicyKey, u32>::try_from(take(&mut ebpf, map_names::ALLOW_CIDR)?)?,
            scope_names: HashMap::<_, ScopeName, u32>::try_from(take(
                &mut ebpf,
                map_names::SCOPE_NAMES,
            )?)?,
            pods: HashMap::try_from(take(&mut ebpf, map_names::POD_SCOPES)?)?,
            trees: HashMap::try_from(take(&mut ebpf, map_names::CG_TREES)?)?,
            tc_config: Array::try_from(take(&mut ebpf, map_names::TC_CONFIG)?)?,
            redirects: HashMap::try_from(take(&mut ebpf, map_names::REDIRECTS)?)?,
        };
        let veths = HashMap::try_from(take(&mut ebpf, map_names::VETHS)?)?;
        let flows = HashMap::try_from(take(&mut ebpf, map_names::FLOWS)?)?;
        let replies = HashMap::try_from(take(&mut ebpf, map_names::REPLIES)?)?;
        let revoked = HashMap::try_from(take(&mut ebpf, map_names::REVOKED)?)?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, map_names::COUNTERS)?)?;
        let dns = DnsMaps {
            config: Array::try_from(take(&mut ebpf, map_names::DNS_CONFIG)?)?,
            upstreams: HashMap::try_from(take(&mut ebpf, map_names::DNS_UPSTREAMS)?)?,
            upstream_addrs: Array::try_from(take(&mut ebpf, map_names::DNS_UPSTREAM_ADDRS)?)?,
            slots: HashMap::try_from(take(&mut ebpf, map_names::DNS_SLOTS)?)?,
            socks: SockMap::try_from(take(&mut ebpf, map_names::DNS_SOCKS)?)?,
            skip: HashMap::try_from(take(&mut ebpf, map_names::DNS_SKIP)?)?,
            current: enforcer_common::DnsConfig::default(),
        };
        let learned = HashMap::try_from(take(&mut ebpf, map_names::LEARNED)?)?;
        tc_links::load_tc(&mut ebpf, &opts.pin_root)?;
        let events = RingBuf::try_from(take(&mut ebpf, map_names::EVENTS)?)?;
        let applied = maps.read_current();
        let scope_ids = maps.read_scope_ids();
        log::info!(
            "datapath ready at {}: adopted {} cgroups, {} exact and {} CIDR entries, {} scopes; pod veths get {}",
            opts.pin_root.display(),
            applied.cgroups.len(),
            applied.exact.len(),
            applied.cidr.len(),
            scope_ids.len(),
            tc_links::attachment()
        );
        Ok((
            Self {
                _ebpf: ebpf,
                maps,
                veths,
                flows,
                replies,
                revoked,
                counters,
                applied,
                scope_ids,
                max_scopes: opts.max_scopes as usize,
                migrating: (!stale.is_empty()).then(|| opts.clone()),
                dns: Some((dns, learned)),
            },
            events,
        ))
    }

    /// Stable scope ids, kept in a pinned map so that a restarted agent agrees with the entries
    /// already in the kernel. Returns the names that got no id (the map is full, or a name is
    /// too long): their workloads fail closed (`plan::FAILED`); nothing else is affected.
    pub fn ensure_scope_ids<'a>(
        &mut self,
        names: impl IntoIterator<Item = &'a String>,
    ) -> Vec<String> {
        let names = names.into_iter().map(String::as_str);
        let allocation = scope_ids::allocate(&self.scope_ids, names, self.max_scopes);
        let mut failed = allocation.failed;
        for (name, id) in allocation.add {
            match self.maps.insert_scope_name(&name, id) {
                Ok(()) => {
                    self.scope_ids.insert(name, id);
                }
                Err(err) => {
                    log::error!("scope {name}: no id: {err:#}");
                    failed.push(name);
                }
            }
        }
        failed
    }

    /// Takes back the ids of scopes no longer `wanted` once no map entry uses them, so that
    /// namespace churn never fills the scope-name map. Returns how many went.
    pub fn reclaim_scope_ids<'a>(&mut self, wanted: impl IntoIterator<Item = &'a String>) -> usize {
        let wanted = wanted.into_iter().map(String::as_str).collect();
        let in_use = self.applied.scope_ids_in_use();
        let keep = [crate::k8s::UNENFORCED];
        let mut reclaimed = 0;
        for name in scope_ids::reclaimable(&self.scope_ids, &wanted, &in_use, &keep) {
            match self.maps.remove_scope_name(&name) {
                Ok(()) => {
                    self.scope_ids.remove(&name);
                    reclaimed += 1;
                }
                // Kept in our view: tried again after the next apply.
                Err(err) => log::warn!("reclaiming the id of scope {name}: {err:#}"),
            }
        }
        reclaimed
    }

    /// Whether the programs wait for the first plan (see [`Datapath::open`]).
    pub fn migrating(&self) -> bool {
        self.migrating.is_some()
    }

    /// Attaches the programs, which replace the old ones, and lets the new maps take the old
    /// ones' place. Call once the maps hold a complete plan.
    pub fn finish_migration(&mut self) -> anyhow::Result<()> {
        let Some(opts) = self.migrating.take() else {
            return Ok(());
        };
        attach_cgroup_programs(&mut self._ebpf, &opts)?;
        migrate::promote(&opts.pin_root)?;
        log::info!("migrated to new maps at {}", opts.pin_root.display());
        Ok(())
    }

    /// Exempts the agent's own cgroup at once, before the agent opens any connection: programs
    /// pinned by an earlier agent are enforcing already, and would judge a new agent pod as an
    /// unmapped pod. Every later plan keeps the entry (`plan::Workloads::agent`).
    pub fn exempt_agent(&mut self, cgroup_id: u64) -> anyhow::Result<()> {
        let failed = self.ensure_scope_ids([&crate::k8s::UNENFORCED.to_string()]);
        anyhow::ensure!(failed.is_empty(), "the scope-name map is full");
        let scope = plan::agent_scope(&self.scope_ids).context("no id for the agent's scope")?;
        self.maps
            .cgroups
            .insert(cgroup_id, scope, 0)
            .context("exempting the agent's own cgroup")?;
        self.applied.cgroups.insert(cgroup_id, scope);
        if let Some(opts) = &self.migrating {
            // The old programs enforce the old maps until the migration ends.
            if let Err(err) = exempt_in_old_maps(&opts.pin_root, cgroup_id) {
                log::warn!("exempting the agent in the old maps: {err:#}");
            }
        }
        Ok(())
    }

    /// The DNS proxy's maps (once).
    pub fn take_dns(&mut self) -> Option<(DnsMaps, LearnedMap)> {
        self.dns.take()
    }

    pub fn set_flags(&mut self, flags: u32) -> anyhow::Result<()> {
        self.maps.set_flags(flags)
    }

    /// A kernel counter ([`enforcer_common::counter`]), summed over the CPUs.
    pub fn counter(&self, index: u32) -> u64 {
        match self.counters.get(&index, 0) {
            Ok(values) => values.iter().sum(),
            Err(err) => {
                log::warn!("reading counter {index}: {err}");
                0
            }
        }
    }

    pub fn scope_ids(&self) -> &BTreeMap<String, u32> {
        &self.scope_ids
    }

    /// What the maps hold, as far as this agent wrote or adopted them.
    pub fn applied(&self) -> &MapPlan {
        &self.applied
    }

    /// Brings the maps to `plan`: new allow entries first, then cgroups, then removals, so that
    /// no moment allows more than either the old or the new state.
    pub fn apply(&mut self, plan: &MapPlan) -> ApplyReport {
        self.maps.apply(&mut self.applied, plan)
    }
}

fn take(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("map {name} is missing from the BPF object"))
}

/// The agent's exemption in maps of the old shape, where they still read as this version's.
fn exempt_in_old_maps(pin_root: &Path, cgroup_id: u64) -> anyhow::Result<()> {
    let names: HashMap<_, ScopeName, u32> = HashMap::try_from(aya::maps::Map::HashMap(
        open_pinned(pin_root, map_names::SCOPE_NAMES)?,
    ))?;
    let mut cgroups: HashMap<_, u64, CgroupScope> = HashMap::try_from(aya::maps::Map::HashMap(
        open_pinned(pin_root, map_names::CGROUPS)?,
    ))?;
    let mut key = ScopeName { name: [0; 64] };
    let name = crate::k8s::UNENFORCED.as_bytes();
    key.name[..name.len()].copy_from_slice(name);
    let scope = names
        .get(&key, 0)
        .context("the old maps have no scope for unenforced workloads")?;
    cgroups.insert(
        cgroup_id,
        CgroupScope {
            scope,
            mode: enforcer_common::mode::ALLOW_ANY,
        },
        0,
    )?;
    Ok(())
}

/// Detaches everything pinned under `pin_root` and removes the pins. Enforcement stops.
pub fn teardown(pin_root: &Path) -> anyhow::Result<()> {
    let links = pin_root.join("links");
    if let Ok(entries) = std::fs::read_dir(&links) {
        for entry in entries.filter_map(Result::ok) {
            match PinnedLink::from_pin(entry.path()) {
                Ok(link) => drop(link.unpin()?),
                Err(err) => log::warn!("{}: {err}", entry.path().display()),
            }
            let _ = std::fs::remove_file(entry.path());
        }
    }
    for dir in ["programs", "maps", "maps_next", "maps_old"] {
        if let Ok(entries) = std::fs::read_dir(pin_root.join(dir)) {
            for entry in entries.filter_map(Result::ok) {
                std::fs::remove_file(entry.path())
                    .with_context(|| format!("removing {}", entry.path().display()))?;
            }
        }
    }
    for dir in ["programs", "maps", "maps_next", "maps_old", "links", ""] {
        let path = pin_root.join(dir);
        if path.exists() {
            std::fs::remove_dir(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Opens the pinned cgroup map read-only, for `enforcer exec` to wait until its cgroup is claimed.
pub fn open_cgroup_map(pin_root: &Path) -> anyhow::Result<HashMap<MapData, u64, CgroupScope>> {
    let data = open_pinned(pin_root, map_names::CGROUPS).context("is the agent running?")?;
    Ok(HashMap::try_from(aya::maps::Map::HashMap(data))?)
}

/// A map an agent pinned under `pin_root`.
pub fn open_pinned(pin_root: &Path, name: &str) -> anyhow::Result<MapData> {
    let path = pin_root.join("maps").join(name);
    MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
}
