//! The only owner of the kernel side: loads the programs, pins programs, links and maps under
//! bpffs, attaches to the cgroup v2 root, and applies map diffs.
//!
//! Restart and upgrade never open a gap: maps are pinned and reused, the new programs are attached
//! beside the old ones (multi-attach), and only then are the old links unpinned and detached.

pub mod bpffs;
pub mod inspect;
mod layout;
mod migrate;
pub mod plan;
pub mod scope_ids;
mod sync;

use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _};
use aya::{
    maps::{Array, HashMap, LpmTrie, MapData, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{NlOptions, TcAttachOptions},
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use enforcer_common::{map_names, program_names, CgroupScope, PolicyKey, ScopeName};

pub use plan::MapPlan;
pub use sync::ApplyReport;

/// Per pod veth, host side: ingress is what the pod sends, egress what it receives.
const TC_PROGRAMS: [(&str, TcAttachType); 2] = [
    (program_names::TC, TcAttachType::Ingress),
    (program_names::TC_REPLY, TcAttachType::Egress),
];

/// The kernel object, built by `build.rs` from `enforcer-ebpf`.
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("ENFORCER_BPF_OBJECT"));

const PROGRAMS: [&str; 4] = [
    program_names::CONNECT4,
    program_names::CONNECT6,
    program_names::SENDMSG4,
    program_names::SENDMSG6,
];

#[derive(Clone, Debug)]
pub struct Options {
    /// Directory under bpffs that holds `maps/`, `programs/` and `links/`.
    pub pin_root: PathBuf,
    pub cgroup_root: PathBuf,
    pub max_exact: u32,
    pub max_cidr: u32,
    /// Capacity of the scope-name map (namespaces and selecting Sidecars in use at once).
    pub max_scopes: u32,
}

pub struct Datapath {
    // Keeps the programs loaded for the lifetime of the agent; the pins keep them after it.
    _ebpf: Ebpf,
    maps: sync::Maps,
    applied: MapPlan,
    scope_ids: BTreeMap<String, u32>,
    max_scopes: usize,
    /// Set while new maps are being filled: the programs are not attached yet.
    migrating: Option<Options>,
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
        };
        load_tc(&mut ebpf, &opts.pin_root)?;
        let events = RingBuf::try_from(take(&mut ebpf, map_names::EVENTS)?)?;
        let applied = maps.read_current();
        let scope_ids = maps.read_scope_ids();
        log::info!(
            "datapath ready at {}: adopted {} cgroups, {} exact and {} CIDR entries, {} scopes",
            opts.pin_root.display(),
            applied.cgroups.len(),
            applied.exact.len(),
            applied.cidr.len(),
            scope_ids.len()
        );
        Ok((
            Self {
                _ebpf: ebpf,
                maps,
                applied,
                scope_ids,
                max_scopes: opts.max_scopes as usize,
                migrating: (!stale.is_empty()).then(|| opts.clone()),
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

    /// Attaches the TC programs to the host side of a pod's veth: the judge on ingress (the
    /// pod's egress), the reply tracker on egress (the way into the pod). The links are pinned
    /// so that they outlive the agent; deleting the veth detaches them.
    pub fn attach_tc(&mut self, ifname: &str, pin_root: &Path) -> anyhow::Result<()> {
        self.attach_tc_indexed(ifname, pin_root).map(drop)
    }

    /// [`Datapath::attach_tc`], returning the index of the interface the links are on: pins are
    /// named after the interface, and the index tells this interface's links from those of a
    /// later interface of the same name (see [`Datapath::forget_tc_of`]).
    pub fn attach_tc_indexed(&mut self, ifname: &str, pin_root: &Path) -> anyhow::Result<u32> {
        // Kernels before 6.6 have no TCX: aya falls back to a filter under clsact.
        let _ = aya::programs::tc::qdisc_add_clsact(ifname);
        let mut pinned = None;
        for (name, direction) in TC_PROGRAMS {
            let prog: &mut SchedClassifier = self
                ._ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} is missing"))?
                .try_into()?;
            let id = prog
                .attach_with_options(ifname, direction, tc_position())
                .with_context(|| format!("attaching {name} to {ifname}"))?;
            let link = prog.take_link(id)?;
            // A netlink filter stays attached on its own; only TCX links need a pin.
            if let Ok(fd_link) = FdLink::try_from(link) {
                let pin = tc_link_pin(pin_root, ifname, name);
                let _ = std::fs::remove_file(&pin);
                fd_link
                    .pin(&pin)
                    .with_context(|| format!("pinning {}", pin.display()))?;
                pinned = Some(pin);
            }
        }
        // The kernel's word where there is a link to ask; the name's index otherwise.
        match pinned.as_deref().map(pinned_tcx_ifindex) {
            Some(Ok(ifindex)) if ifindex != 0 => Ok(ifindex),
            _ => crate::veth::ifindex(ifname)
                .with_context(|| format!("looking up {ifname}"))?
                .with_context(|| format!("{ifname} went while its TC programs were attached")),
        }
    }

    /// Forgets the pins of detached TC links (their veth is gone).
    pub fn forget_tc(&mut self, ifname: &str, pin_root: &Path) {
        for (name, _) in TC_PROGRAMS {
            let _ = std::fs::remove_file(tc_link_pin(pin_root, ifname, name));
        }
    }

    /// Removes the pins of the TC links that [`Datapath::attach_tc_indexed`] put on interface
    /// `ifindex`, then named `ifname`, which detaches them. Pins whose link is on another
    /// interface of that name now are left: Calico names a veth after its pod, so a
    /// StatefulSet's next pod gets the name and its links the pins. Pins of links without an
    /// interface are stale (the kernel detached them with it) and go too.
    pub fn forget_tc_of(&mut self, ifname: &str, ifindex: u32, pin_root: &Path) {
        for (name, _) in TC_PROGRAMS {
            let pin = tc_link_pin(pin_root, ifname, name);
            match pinned_tcx_ifindex(&pin) {
                Ok(now) if now == ifindex || now == 0 => {
                    if let Err(err) = std::fs::remove_file(&pin) {
                        log::warn!("removing {}: {err}", pin.display());
                    }
                }
                Ok(now) => log::info!("{} is interface {now}'s now; left", pin.display()),
                // A legacy netlink filter has no pin; it goes with its veth.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => log::warn!("{}: {err}; left in place", pin.display()),
            }
        }
    }

    pub fn set_flags(&mut self, flags: u32) -> anyhow::Result<()> {
        self.maps.set_flags(flags)
    }

    pub fn scope_ids(&self) -> &BTreeMap<String, u32> {
        &self.scope_ids
    }

    /// Brings the maps to `plan`: new allow entries first, then cgroups, then removals, so that
    /// no moment allows more than either the old or the new state.
    pub fn apply(&mut self, plan: &MapPlan) -> ApplyReport {
        self.maps.apply(&mut self.applied, plan)
    }
}

/// In front of the CNI's programs, on purpose: a CNI program that redirects (Cilium's
/// `cil_from_container`, Calico's) ends the chain, and the judge must see every packet before
/// that. Our programs pass with `TCX_NEXT`, so the CNI's still run after them. Under TCX that is
/// the chain's head at attach time; on kernels before 6.6 a legacy cls_bpf filter at priority 1.
fn tc_position() -> TcAttachOptions {
    let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    if tcx {
        TcAttachOptions::TcxOrder(LinkOrder::first())
    } else {
        TcAttachOptions::Netlink(NlOptions {
            priority: 1,
            ..NlOptions::default()
        })
    }
}

fn take(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("map {name} is missing from the BPF object"))
}

/// `links/tc_<ifname>` for the judge, `links/tc_<ifname>_reply` for the reply tracker.
fn tc_link_pin(pin_root: &Path, ifname: &str, program: &str) -> PathBuf {
    let suffix = if program == program_names::TC_REPLY {
        "_reply"
    } else {
        ""
    };
    pin_root
        .join("links")
        .join(format!("{TC_PIN_PREFIX}{ifname}{suffix}"))
}

const TC_PIN_PREFIX: &str = "tc_";

/// Removes the pins of TC links whose interface is gone: pods deleted while no agent ran. The
/// kernel detached those links with their veth; only the pins were left. Returns how many went.
///
/// The link itself says whether it still has an interface, which a name cannot: `tc_a_reply`
/// may be `a`'s reply tracker or `a_reply`'s judge, and a name may belong to a newer interface.
pub fn sweep_stale_tc(pin_root: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(pin_root.join("links")) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(TC_PIN_PREFIX) {
            continue;
        }
        let pin = entry.path();
        match pinned_tcx_ifindex(&pin) {
            Ok(0) => match std::fs::remove_file(&pin) {
                Ok(()) => removed += 1,
                Err(err) => log::warn!("removing {}: {err}", pin.display()),
            },
            Ok(_) => {}
            // Kept: removing the last pin of a link that is attached would detach it.
            Err(err) => log::warn!("{}: {err}; left in place", pin.display()),
        }
    }
    removed
}

/// The index of the interface a pinned TCX link is on, as the kernel has it: 0 once the
/// interface is gone, which detached the link. aya 0.14 reads `bpf_link_info` but does not
/// expose its TCX part, hence bpf(2) here.
fn pinned_tcx_ifindex(pin: &Path) -> std::io::Result<u32> {
    use aya_obj::generated::{bpf_cmd, bpf_link_info, bpf_link_type};
    use std::os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    };

    /// The head of `union bpf_attr` for BPF_OBJ_GET.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    /// The head of `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }

    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())
        .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err))?;
    let mut get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        // Links are only handed out read-write.
        file_flags: 0,
    };
    let fd = bpf(bpf_cmd::BPF_OBJ_GET, &mut get)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `bpf_link_info` is plain data, for which all zeroes is valid (and expected).
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<bpf_link_info>() as u32,
        info: std::ptr::addr_of_mut!(info) as u64,
    };
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    if info.type_ != bpf_link_type::BPF_LINK_TYPE_TCX as u32 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a TCX link (type {})", info.type_),
        ));
    }
    // SAFETY: the kernel filled the union's TCX member, the link being a TCX link.
    Ok(unsafe { info.__bindgen_anon_1.tcx.ifindex })
}

/// bpf(2) with `attr`, the head of `union bpf_attr` that `cmd` reads: the kernel takes a shorter
/// attr as zero-extended.
fn bpf<T>(cmd: aya_obj::generated::bpf_cmd, attr: &mut T) -> std::io::Result<i32> {
    // SAFETY: `attr` is valid for `size_of::<T>()` bytes and outlives the call; the pointers in
    // it point at memory that outlives the call as well.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    i32::try_from(rc).map_err(std::io::Error::other)
}

/// Loads the classifiers and pins them; they are attached per pod veth.
fn load_tc(ebpf: &mut Ebpf, pin_root: &Path) -> anyhow::Result<()> {
    for (name, _) in TC_PROGRAMS {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} is missing"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("loading program {name}"))?;
        let pin = pin_root.join("programs").join(name);
        let _ = std::fs::remove_file(&pin);
        prog.pin(&pin)
            .with_context(|| format!("pinning program {}", pin.display()))?;
    }
    Ok(())
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

/// The four connect and sendmsg programs on the cgroup root, each replacing its predecessor.
fn attach_cgroup_programs(ebpf: &mut Ebpf, opts: &Options) -> anyhow::Result<()> {
    let cgroup = File::open(&opts.cgroup_root)
        .with_context(|| format!("opening cgroup {}", opts.cgroup_root.display()))?;
    for name in PROGRAMS {
        attach_replacing(ebpf, name, &cgroup, &opts.pin_root)?;
    }
    Ok(())
}

fn attach_replacing(
    ebpf: &mut Ebpf,
    name: &str,
    cgroup: &File,
    pin_root: &Path,
) -> anyhow::Result<()> {
    let prog: &mut CgroupSockAddr = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} is missing from the BPF object"))?
        .try_into()?;
    prog.load()
        .with_context(|| format!("loading program {name}"))?;
    // bpf_link-based cgroup attachments are always multi-attach, and take no flags.
    let link_id = prog
        .attach(cgroup, CgroupAttachMode::Single)
        .with_context(|| format!("attaching {name} to the cgroup root"))?;
    let link: FdLink = prog
        .take_link(link_id)?
        .try_into()
        .context("converting the link")?;

    let link_pin = pin_root.join("links").join(name);
    let staged = pin_root.join("links").join(format!("{name}_next"));
    let _ = std::fs::remove_file(&staged);
    link.pin(&staged)
        .with_context(|| format!("pinning link {}", staged.display()))?;
    // The new program is enforcing now; the old link, if any, can go.
    if link_pin.exists() {
        match PinnedLink::from_pin(&link_pin) {
            Ok(old) => drop(old.unpin().context("unpinning the previous link")?),
            Err(err) => log::warn!("could not open previous link {}: {err}", link_pin.display()),
        }
        let _ = std::fs::remove_file(&link_pin);
    }
    std::fs::rename(&staged, &link_pin)
        .with_context(|| format!("renaming {}", staged.display()))?;

    let prog_pin = pin_root.join("programs").join(name);
    let _ = std::fs::remove_file(&prog_pin);
    prog.pin(&prog_pin)
        .with_context(|| format!("pinning program {}", prog_pin.display()))?;
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
