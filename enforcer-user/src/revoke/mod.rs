//! Revocation without TC. The cgroup hooks judge `connect()` and `sendmsg()` only, and TC runs
//! only on pod veths, so an established TCP connection or a connected UDP socket in the host's
//! network namespace (local mode, hostNetwork pods) would outlive the rule that allowed it.
//! After an apply changed the maps, every such socket of the agent's network namespace is
//! judged as the kernel programs judge a connect() (its cgroup's scope, protocol, destination
//! address and port) under the maps before and after the apply; what the old maps let pass and
//! the new ones refuse is destroyed (sock_diag `SOCK_DESTROY`), or only reported in AUDIT mode.

mod sock_diag;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use enforcer_common::{mode, proto, CgroupScope, PolicyKey};

use self::sock_diag::{state, DiagError, SockDiag, Socket};
use crate::{datapath::MapPlan, net::key_bytes};

/// Deepest cgroup level the kernel programs search for a claimed ancestor (`MAX_TREE_LEVEL`).
const MAX_TREE_LEVEL: usize = 24;
/// Bounds the cgroup walk, whatever the host's tree holds.
const MAX_CGROUPS: usize = 1_000_000;
/// At most this many errors are kept from one sweep; the rest are counted.
const MAX_ERRORS: usize = 8;

/// What the kernel programs make of a connect() from a cgroup to a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not enforced (no scope claims the cgroup), ALLOW_ANY, or allowed by a rule.
    Pass,
    /// Refused by the rules, but the scope's mode is AUDIT: it passes and is reported.
    Audit,
    Refuse,
}

/// What a sweep does to a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Destroy,
    /// AUDIT: reported as what REGISTRY_ONLY would revoke, left open.
    Report,
}

/// What the old maps did and the new ones do with a flow: act only where a change of maps
/// refuses what they allowed. A socket that was refused under the old maps too was not opened
/// through them (before the agent, or an address a socket-LB rewrote) and is left alone.
pub fn action(old: Verdict, new: Verdict) -> Option<Action> {
    match (old, new) {
        (Verdict::Pass | Verdict::Audit, Verdict::Refuse) => Some(Action::Destroy),
        (Verdict::Pass, Verdict::Audit) => Some(Action::Report),
        _ => None,
    }
}

/// The cgroup hierarchy as child id to parent id, for the scope of cgroups that only a
/// claimed ancestor (`MapPlan::trees`) covers.
#[derive(Debug, Default)]
pub struct Hierarchy {
    parents: BTreeMap<u64, u64>,
}

impl Hierarchy {
    pub fn from_parents(parents: BTreeMap<u64, u64>) -> Self {
        Self { parents }
    }

    /// Walks the cgroup2 mount at `root`: a cgroup's id is its directory's inode number.
    pub fn read(root: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let root_id = crate::cgroup::cgroup_id(root)?;
        let mut parents = BTreeMap::new();
        let mut todo = vec![(root.to_path_buf(), root_id)];
        while let Some((dir, id)) = todo.pop() {
            if parents.len() >= MAX_CGROUPS {
                anyhow::bail!("more than {MAX_CGROUPS} cgroups under {}", root.display());
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.filter_map(Result::ok) {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                if let Ok(meta) = entry.metadata() {
                    parents.insert(meta.ino(), id);
                    todo.push((entry.path(), meta.ino()));
                }
            }
        }
        Ok(Self { parents })
    }

    /// `id`'s ancestors from the top level down, `id` last; the root itself is left out, as
    /// the kernel's walk starts at level 1.
    fn levels(&self, id: u64) -> Vec<u64> {
        let mut chain = vec![id];
        let mut at = id;
        while let Some(&parent) = self.parents.get(&at) {
            if chain.len() > MAX_CGROUPS {
                break;
            }
            chain.push(parent);
            at = parent;
        }
        // The last one has no parent: the root (level 0).
        chain.pop();
        chain.reverse();
        chain
    }
}

/// The scope of a cgroup as the connect hooks find it: its own `cgroups` entry, else the
/// deepest claimed ancestor in `trees` (searched to level [`MAX_TREE_LEVEL`]), else none.
pub fn scope_of(plan: &MapPlan, hierarchy: &Hierarchy, cgroup: u64) -> Option<CgroupScope> {
    if let Some(scope) = plan.cgroups.get(&cgroup) {
        return Some(*scope);
    }
    if plan.trees.is_empty() {
        return None;
    }
    hierarchy
        .levels(cgroup)
        .iter()
        .take(MAX_TREE_LEVEL)
        .filter_map(|id| plan.trees.get(id))
        .next_back()
        .copied()
}

/// A flow as the kernel programs key it: protocol, destination and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Destination {
    pub proto: u8,
    pub addr: IpAddr,
    pub port: u16,
}

/// How `plan` judges a connect() from `cgroup` to `dst`.
pub fn judge(plan: &MapPlan, hierarchy: &Hierarchy, cgroup: u64, dst: Destination) -> Verdict {
    let Some(scope) = scope_of(plan, hierarchy, cgroup) else {
        return Verdict::Pass;
    };
    if scope.mode == mode::ALLOW_ANY {
        return Verdict::Pass;
    }
    let key = PolicyKey {
        scope: scope.scope,
        port: dst.port,
        proto: dst.proto,
        pad: 0,
        addr: key_bytes(dst.addr),
    };
    match (plan.allows(&key), scope.mode) {
        (true, _) => Verdict::Pass,
        (false, mode::AUDIT) => Verdict::Audit,
        (false, _) => Verdict::Refuse,
    }
}

/// A socket a sweep destroyed, or reported in AUDIT mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    pub action: Action,
    pub cgroup: u64,
    /// The scope under the new maps.
    pub scope: u32,
    pub dst: Destination,
}

/// What one sweep did.
#[derive(Debug, Default)]
pub struct Sweep {
    /// Sockets destroyed, and AUDIT reports.
    pub revocations: Vec<Revocation>,
    pub errors: Vec<String>,
    /// Errors beyond [`MAX_ERRORS`].
    pub more_errors: usize,
}

impl Sweep {
    fn error(&mut self, err: String) {
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(err);
        } else {
            self.more_errors += 1;
        }
    }

    pub fn destroyed(&self) -> usize {
        self.revocations
            .iter()
            .filter(|r| r.action == Action::Destroy)
            .count()
    }
}

/// TCP states of sockets that have a destination: not LISTEN, not TIME_WAIT or a request.
const TCP_CONNECTED: [u8; 7] = [
    state::ESTABLISHED,
    state::SYN_SENT,
    state::FIN_WAIT1,
    state::FIN_WAIT2,
    state::CLOSE_WAIT,
    state::LAST_ACK,
    state::CLOSING,
];

fn state_mask(states: &[u8]) -> u32 {
    states.iter().fold(0, |m, s| m | 1 << s)
}

/// Judges every TCP and UDP socket with a destination in this network namespace under `old`
/// and `new` maps, and destroys what `new` revokes. Never fails: what went wrong is in the
/// result's errors.
pub fn sweep(old: &MapPlan, new: &MapPlan, cgroup_root: &Path) -> Sweep {
    let mut out = Sweep::default();
    let mut diag = match SockDiag::open() {
        Ok(d) => d,
        Err(err) => {
            out.error(err.to_string());
            return out;
        }
    };
    let sockets = outbound(&mut diag, &mut out);
    if sockets.iter().any(|s| s.cgroup.is_none()) {
        out.error("the kernel reports no cgroup of sockets (INET_DIAG_CGROUP_ID, Linux 5.7): established flows are not revoked".into());
    }
    let claimed = |c: &u64| new.cgroups.contains_key(c) && old.cgroups.contains_key(c);
    let needs_tree = (!new.trees.is_empty() || !old.trees.is_empty())
        && sockets
            .iter()
            .filter_map(|s| s.cgroup.as_ref())
            .any(|c| !claimed(c));
    let hierarchy = match needs_tree {
        true => Hierarchy::read(cgroup_root).unwrap_or_else(|err| {
            out.error(format!("reading the cgroup tree: {err:#}"));
            Hierarchy::default()
        }),
        false => Hierarchy::default(),
    };
    for socket in &sockets {
        let Some(cgroup) = socket.cgroup else {
            continue;
        };
        let dst = Destination {
            proto: socket.proto,
            addr: crate::policy::canonical_ip(socket.dst),
            port: socket.dport,
        };
        let before = judge(old, &hierarchy, cgroup, dst);
        let after = judge(new, &hierarchy, cgroup, dst);
        let Some(action) = action(before, after) else {
            continue;
        };
        if action == Action::Destroy {
            match diag.destroy(socket) {
                Ok(()) => {}
                // Closed meanwhile.
                Err(err) if err.errno() == Some(libc::ENOENT) => continue,
                Err(err) => {
                    out.error(destroy_error(&err, dst));
                    continue;
                }
            }
        }
        let scope = scope_of(new, &hierarchy, cgroup).map_or(0, |s| s.scope);
        out.revocations.push(Revocation {
            action,
            cgroup,
            scope,
            dst,
        });
    }
    out
}

fn destroy_error(err: &DiagError, dst: Destination) -> String {
    let what = format!(
        "destroying a socket to {}/{}",
        crate::net::SocketFmt(dst.addr, dst.port),
        proto_name(dst.proto)
    );
    match err.errno() {
        Some(libc::EOPNOTSUPP) => format!(
            "{what}: this kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY is off); established flows outlive their rules"
        ),
        _ => format!("{what}: {err}"),
    }
}

fn proto_name(p: u8) -> &'static str {
    match p {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        _ => "other",
    }
}

/// The sockets this namespace's workloads connected: TCP not listening (and not accepted from a
/// local listener), UDP connected to a port. Sockets no file refers to are left out.
fn outbound(diag: &mut SockDiag, out: &mut Sweep) -> Vec<Socket> {
    let tcp = libc::IPPROTO_TCP as u8;
    let udp = libc::IPPROTO_UDP as u8;
    let mut sockets = Vec::new();
    let mut listening = BTreeSet::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let tcp_states = state_mask(&TCP_CONNECTED) | state_mask(&[state::LISTEN]);
        let dumps = [
            (tcp, tcp_states, "TCP"),
            (udp, state_mask(&[state::ESTABLISHED]), "UDP"),
        ];
        for (proto, states, name) in dumps {
            match diag.dump(family, proto, states) {
                Ok(found) => sockets.extend(found),
                Err(err) => out.error(format!(
                    "listing {name} sockets (family {family}): {err}; established flows of that kind are not revoked"
                )),
            }
        }
    }
    for s in sockets.iter().filter(|s| s.state == state::LISTEN) {
        listening.insert(s.sport);
    }
    sockets.retain(|s| {
        s.inode != 0
            && s.dport != 0
            && s.state != state::LISTEN
            && !(s.proto == tcp && accepted(s, &listening))
    });
    sockets
}

/// A TCP socket a local listener accepted: its destination is a client, not where the
/// workload connected to. inet_diag does not tell; a listener on the local port does (a
/// connect() never gets a port a listener holds).
fn accepted(socket: &Socket, listening: &BTreeSet<u16>) -> bool {
    listening.contains(&socket.sport)
}

#[cfg(test)]
mod tests;
