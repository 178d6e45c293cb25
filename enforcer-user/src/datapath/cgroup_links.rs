//! The cgroup programs on the cgroup v2 root, each attached beside its predecessor before the
//! predecessor's link goes, so that an upgrade never leaves a moment without enforcement.

use std::{
    fs::File,
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
};

use anyhow::{anyhow, Context as _};
use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSkbAttachType, Program,
    },
    Ebpf,
};
use aya_obj::generated::bpf_attach_type;
use enforcer_common::program_names;

use super::{sys, Options};

/// Every cgroup program: the address hooks, socket creation and options, the egress check, and
/// the DNS proxy's replies and addresses.
const PROGRAMS: [&str; 11] = [
    program_names::CONNECT4,
    program_names::CONNECT6,
    program_names::SENDMSG4,
    program_names::SENDMSG6,
    program_names::SOCK_CREATE,
    program_names::SETSOCKOPT,
    program_names::SKB_EGRESS,
    program_names::RECVMSG4,
    program_names::GETPEERNAME4,
    program_names::BIND4,
    program_names::BIND6,
];

pub(super) fn attach_cgroup_programs(ebpf: &mut Ebpf, opts: &Options) -> anyhow::Result<()> {
    let cgroup = File::open(&opts.cgroup_root)
        .with_context(|| format!("opening cgroup {}", opts.cgroup_root.display()))?;
    for name in PROGRAMS {
        let prog = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} is missing from the BPF object"))?;
        let link = load_and_attach(prog, &cgroup)
            .with_context(|| format!("attaching {name} to the cgroup root"))?;
        replace_link(link, name, &opts.pin_root)?;
        let prog_pin = opts.pin_root.join("programs").join(name);
        let _ = std::fs::remove_file(&prog_pin);
        prog.pin(&prog_pin)
            .with_context(|| format!("pinning program {}", prog_pin.display()))?;
    }
    Ok(())
}

/// A new link, to be pinned.
enum NewLink {
    Aya(FdLink),
    Raw(OwnedFd),
}

impl NewLink {
    fn pin(self, path: &Path) -> anyhow::Result<()> {
        match self {
            Self::Aya(link) => drop(link.pin(path)?),
            Self::Raw(fd) => sys::obj_pin(fd.as_fd(), path)?,
        }
        Ok(())
    }
}

/// bpf_link-based cgroup attachments are always multi-attach, and take no flags.
fn load_and_attach(prog: &mut Program, cgroup: &File) -> anyhow::Result<NewLink> {
    let mode = CgroupAttachMode::Single;
    let link = match prog {
        Program::CgroupSockAddr(p) => {
            p.load()?;
            let id = p.attach(cgroup, mode)?;
            FdLink::try_from(p.take_link(id)?)?
        }
        Program::CgroupSock(p) => {
            p.load()?;
            let id = p.attach(cgroup, mode)?;
            FdLink::try_from(p.take_link(id)?)?
        }
        Program::CgroupSockopt(p) => {
            p.load()?;
            let attach = bpf_attach_type::BPF_CGROUP_SETSOCKOPT;
            return Ok(NewLink::Raw(sys::link_create(
                p.fd()?.as_fd(),
                cgroup.as_fd(),
                attach,
            )?));
        }
        Program::CgroupSkb(p) => {
            p.load()?;
            let id = p.attach(cgroup, CgroupSkbAttachType::Egress, mode)?;
            FdLink::try_from(p.take_link(id)?)?
        }
        other => anyhow::bail!("{:?} is not a cgroup program", other.prog_type()),
    };
    Ok(NewLink::Aya(link))
}

/// Pins the new link, then unpins (detaches) the previous one of that name.
fn replace_link(link: NewLink, name: &str, pin_root: &Path) -> anyhow::Result<()> {
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
    std::fs::rename(&staged, &link_pin).with_context(|| format!("renaming {}", staged.display()))
}
