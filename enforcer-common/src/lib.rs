//! Types shared by the kernel programs and the agent.
//!
//! Every type is `#[repr(C)]`, has no implicit padding, no `bool`, enum or `Option` field, and a
//! compile-time size check, so both sides agree on the bytes without relying on BTF.
#![no_std]

/// Names of the maps, as they are pinned under bpffs.
pub mod map_names {
    pub const CGROUPS: &str = "ENF_CGROUPS";
    /// Cgroups that claim their descendants too (Kubernetes pods, the kubelet's root).
    pub const CG_TREES: &str = "ENF_CG_TREES";
    pub const ALLOW_EXACT: &str = "ENF_ALLOW_EXACT";
    pub const ALLOW_CIDR: &str = "ENF_ALLOW_CIDR";
    pub const EVENTS: &str = "ENF_EVENTS";
    pub const SCOPE_NAMES: &str = "ENF_SCOPE_NAMES";
    /// Pod address to scope, for the TC program.
    pub const POD_SCOPES: &str = "ENF_POD_SCOPES";
    /// Per-flow verdict cache of the TC program.
    pub const FLOWS: &str = "ENF_FLOWS";
    pub const TC_CONFIG: &str = "ENF_TC_CONFIG";
}

/// Names of the programs in the object file.
pub mod program_names {
    pub const CONNECT4: &str = "enforcer_connect4";
    pub const CONNECT6: &str = "enforcer_connect6";
    pub const SENDMSG4: &str = "enforcer_sendmsg4";
    pub const SENDMSG6: &str = "enforcer_sendmsg6";
    /// `sched_cls` on the host side of a pod's veth (its ingress is the pod's egress).
    pub const TC: &str = "enforcer_tc";
    pub const TC_REPLY: &str = "enforcer_reply";
}

/// Scope mode values stored in [`CgroupScope::mode`].
pub mod mode {
    pub const ALLOW_ANY: u32 = 1;
    pub const REGISTRY_ONLY: u32 = 2;
    /// Allows everything but reports what REGISTRY_ONLY would refuse.
    pub const AUDIT: u32 = 3;
}

/// Verdicts carried by [`DenyEvent::verdict`].
pub mod verdict {
    pub const DENIED: u8 = 1;
    pub const AUDIT: u8 = 2;
    /// A flow allowed under an older policy generation is now refused.
    pub const REVOKED: u8 = 3;
}

/// Hooks carried by [`DenyEvent::hook`].
pub mod hook {
    pub const CONNECT4: u8 = 1;
    pub const CONNECT6: u8 = 2;
    pub const SENDMSG4: u8 = 3;
    pub const SENDMSG6: u8 = 4;
    pub const TC: u8 = 5;
}

/// IP protocol numbers as they appear in keys.
pub mod proto {
    pub const ANY: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

/// Bits of [`TcConfig::flags`] (read by the connect hooks too).
pub mod tc_flags {
    /// Judge ICMP like other traffic (no ServiceEntry allows it); otherwise it passes.
    pub const JUDGE_ICMP: u32 = 1;
    /// `CG_TREES` is in use: the connect hooks look for a claimed ancestor of an unclaimed
    /// cgroup (Kubernetes mode).
    pub const CG_TREES: u32 = 2;
}

/// Scope id reserved for the always-allowed CIDRs (loopback, `--allow-cidr`).
pub const GLOBAL_SCOPE: u32 = 0;

/// Scope id of workloads whose scope could not get an id (the scope-name map is full): no rule
/// names it, so with mode REGISTRY_ONLY they are refused everything but the global CIDRs.
pub const FAILED_SCOPE: u32 = u32::MAX;

/// Bits of [`PolicyKey`] before the address: scope, port, protocol and padding.
pub const POLICY_KEY_HEADER_BITS: u32 = 64;

/// Value of `CGROUPS`: which scope a cgroup belongs to and that scope's mode.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CgroupScope {
    pub scope: u32,
    pub mode: u32,
}
const _: () = assert!(core::mem::size_of::<CgroupScope>() == 8);

/// Key of `ALLOW_EXACT`, and the data part of the `ALLOW_CIDR` trie key.
///
/// Addresses are always 16 bytes: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`), so a v4-mapped
/// IPv6 destination is judged exactly as its IPv4 address. In the trie the first
/// [`POLICY_KEY_HEADER_BITS`] bits are always matched in full, and the prefix applies to `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub scope: u32,
    /// Host byte order. 0 only for global entries, which match any port.
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 24);

/// A refusal, or an AUDIT would-refuse, sent to userspace through the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenyEvent {
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub scope: u32,
    pub pid: u32,
    pub comm: [u8; 16],
    /// IPv4 is IPv4-mapped, as in [`PolicyKey`].
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub proto: u8,
    pub verdict: u8,
    pub hook: u8,
    pub pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<DenyEvent>() == 64);

/// Key of `SCOPE_NAMES`: a namespace name, NUL-padded. Kubernetes names are at most 63 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScopeName {
    pub name: [u8; 64],
}
const _: () = assert!(core::mem::size_of::<ScopeName>() == 64);

/// Key of `FLOWS`: a pod's flow, as the TC program sees it leave the pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host byte order; 0 for protocols without ports.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// Value of `FLOWS`: the verdict and the policy generation it was decided under.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowVerdict {
    pub generation: u32,
    /// One of [`flow`].
    pub allowed: u32,
}

/// Values of [`FlowVerdict::allowed`].
pub mod flow {
    pub const REFUSED: u32 = 0;
    pub const ALLOWED: u32 = 1;
    /// The pod's side of a connection a peer opened to it: passes under every generation, as
    /// conntrack lets replies pass.
    pub const REPLY: u32 = 2;
    /// Refused, but the pod's mode is AUDIT: it passes.
    pub const AUDITED: u32 = 3;
}
const _: () = assert!(core::mem::size_of::<FlowVerdict>() == 8);

/// Element 0 of `TC_CONFIG`. The agent bumps `generation` after every change of the allow
/// maps, which invalidates every cached flow verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcConfig {
    pub generation: u32,
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<TcConfig>() == 8);

/// Maps `a.b.c.d` (bytes in network order) to `::ffff:a.b.c.d`.
pub const fn ipv4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all fields are plain integers or byte arrays and there is no implicit padding
    // (checked by the size assertions above), so every bit pattern is valid.
    unsafe impl aya::Pod for super::CgroupScope {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::DenyEvent {}
    unsafe impl aya::Pod for super::ScopeName {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowVerdict {}
    unsafe impl aya::Pod for super::TcConfig {}
}
