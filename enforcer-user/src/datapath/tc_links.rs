//! The TC programs on pod veths: loaded and pinned with the others, attached per veth at the
//! head of the chain, and their link pins kept or swept by the interface the kernel reports.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _};
use aya::maps::{HashMap, MapData};
use aya::{
    programs::{
        links::FdLink,
        tc::{NlOptions, TcAttachOptions},
        LinkOrder, SchedClassifier, TcAttachType,
    },
    util::KernelVersion,
    Ebpf,
};
use enforcer_common::{program_names, FlowKey, VethPod};

use super::Datapath;

/// Per pod veth, host side: ingress is what the pod sends, egress what it receives.
const TC_PROGRAMS: [(&str, TcAttachType); 2] = [
    (program_names::TC, TcAttachType::Ingress),
    (program_names::TC_REPLY, TcAttachType::Egress),
];
impl Datapath {
    /// Attaches the TC programs to the host side of a pod's veth: the judge on ingress (the
    /// pod's egress), the reply tracker on egress (the way into the pod). The links are pinned
    /// so that they outlive the agent; deleting the veth detaches them.
    pub fn attach_tc(
        &mut self,
        ifname: &str,
        pod_addrs: &[IpAddr],
        pin_root: &Path,
    ) -> anyhow::Result<()> {
        self.attach_tc_indexed(ifname, pod_addrs, pin_root)
            .map(drop)
    }

    /// [`Datapath::attach_tc`], returning the index of the interface the links are on: pins are
    /// named after the interface, and the index tells this interface's links from those of a
    /// later interface of the same name (see [`Datapath::forget_tc_of`]).
    ///
    /// The judge drops every packet on the veth whose source is not one of `pod_addrs`, so they
    /// are registered first.
    pub fn attach_tc_indexed(
        &mut self,
        ifname: &str,
        pod_addrs: &[IpAddr],
        pin_root: &Path,
    ) -> anyhow::Result<u32> {
        let ifindex = crate::veth::ifindex(ifname)
            .with_context(|| format!("looking up {ifname}"))?
            .with_context(|| format!("{ifname} is gone"))?;
        self.veths
            .insert(ifindex, veth_pod(pod_addrs)?, 0)
            .with_context(|| format!("registering the pod addresses of {ifname}"))?;
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

    /// Removes the pins of the TC links that [`Datapath::attach_tc_indexed`] put on interface
    /// `ifindex`, then named `ifname`, which detaches them. Pins whose link is on another
    /// interface of that name now are left: Calico names a veth after its pod, so a
    /// StatefulSet's next pod gets the name and its links the pins. Pins of links without an
    /// interface are stale (the kernel detached them with it) and go too.
    pub fn forget_tc_of(&mut self, ifname: &str, ifindex: u32, pin_root: &Path) {
        if let Ok(pod) = self.veths.get(&ifindex, 0) {
            let _ = self.veths.remove(&ifindex);
            self.purge_flows(&pod);
        }
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
}

impl Datapath {
    /// Removes the flow entries of a pod that went (verdicts, replies, revocations), so that
    /// none follows its address to the next pod that gets it: a reply passes under every
    /// generation.
    fn purge_flows(&mut self, pod: &VethPod) {
        let theirs = |k: &FlowKey| {
            let mine = |a: &[u8; 16]| *a != [0; 16] && pod.addrs.contains(a);
            mine(&k.src) || mine(&k.dst)
        };
        let purged = purge(&mut self.flows, theirs)
            + purge(&mut self.replies, theirs)
            + purge(&mut self.revoked, theirs);
        if purged > 0 {
            log::info!("purged {purged} flow entries of a pod that went");
        }
    }
}

/// Removes the keys `theirs` picks; returns how many.
fn purge<V: aya::Pod>(
    map: &mut HashMap<MapData, FlowKey, V>,
    theirs: impl Fn(&FlowKey) -> bool,
) -> usize {
    let keys: Vec<FlowKey> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| theirs(k))
        .collect();
    for key in &keys {
        // Gone meanwhile (the LRU evicted it): nothing to do.
        let _ = map.remove(key);
    }
    keys.len()
}

impl Datapath {
    /// The pod veths with TC programs, by interface index, each with its pod's addresses.
    pub fn veth_addresses(&self) -> std::collections::BTreeMap<u32, Vec<IpAddr>> {
        self.veths
            .iter()
            .filter_map(Result::ok)
            .map(|(ifindex, pod)| {
                let addrs = pod
                    .addrs
                    .iter()
                    .filter(|a| **a != [0; 16])
                    .map(|a| crate::net::from_key_bytes(*a))
                    .collect();
                (ifindex, addrs)
            })
            .collect()
    }
}

/// A pod's addresses in key form: its first of each family (Kubernetes gives one of each).
fn veth_pod(addrs: &[IpAddr]) -> anyhow::Result<VethPod> {
    let v4 = addrs.iter().find(|a| a.is_ipv4());
    let v6 = addrs.iter().find(|a| a.is_ipv6());
    anyhow::ensure!(v4.or(v6).is_some(), "the pod has no address");
    let mut pod = VethPod::default();
    for (slot, addr) in pod.addrs.iter_mut().zip(v4.into_iter().chain(v6)) {
        *slot = crate::net::key_bytes(*addr);
    }
    Ok(pod)
}

fn has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// How TC programs attach on this kernel, for the start's log line.
pub fn attachment() -> &'static str {
    if has_tcx() {
        "TCX links (pinned)"
    } else {
        "netlink clsact filters (no TCX before 6.6; they stay on the qdisc)"
    }
}

/// In front of the CNI's programs, on purpose: a CNI program that redirects (Cilium's
/// `cil_from_container`, Calico's) ends the chain, and the judge must see every packet before
/// that. Our programs pass with `TCX_NEXT`, so the CNI's still run after them. Under TCX that is
/// the chain's head at attach time; on kernels before 6.6 a legacy cls_bpf filter at priority 1.
fn tc_position() -> TcAttachOptions {
    if has_tcx() {
        TcAttachOptions::TcxOrder(LinkOrder::first())
    } else {
        TcAttachOptions::Netlink(NlOptions {
            priority: 1,
            ..NlOptions::default()
        })
    }
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
    let fd = super::sys::bpf(bpf_cmd::BPF_OBJ_GET, &mut get)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `bpf_link_info` is plain data, for which all zeroes is valid (and expected).
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<bpf_link_info>() as u32,
        info: std::ptr::addr_of_mut!(info) as u64,
    };
    super::sys::bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    if info.type_ != bpf_link_type::BPF_LINK_TYPE_TCX as u32 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a TCX link (type {})", info.type_),
        ));
    }
    // SAFETY: the kernel filled the union's TCX member, the link being a TCX link.
    Ok(unsafe { info.__bindgen_anon_1.tcx.ifindex })
}

/// Loads the classifiers and pins them; they are attached per pod veth.
pub(super) fn load_tc(ebpf: &mut Ebpf, pin_root: &Path) -> anyhow::Result<()> {
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
