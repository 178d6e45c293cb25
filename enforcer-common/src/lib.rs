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
    /// Connections peers opened to pods, whose replies pass: apart from `FLOWS`, so that a
    /// pod's own flows cannot evict them.
    pub const REPLIES: &str = "ENF_REPLIES";
    /// Flows the TC program revoked: a peer's packet never turns one into a reply.
    pub const REVOKED: &str = "ENF_REVOKED";
    pub const TC_CONFIG: &str = "ENF_TC_CONFIG";
    /// Pod veth (host side ifindex) to the pod's own addresses: the TC judge's anti-spoofing.
    pub const VETHS: &str = "ENF_VETHS";
    /// First-fragment verdicts, for the fragments that follow (they carry no ports).
    pub const FRAGS: &str = "ENF_FRAGS";
    /// Per-CPU counters, indexed by [`crate::counter`].
    pub const COUNTERS: &str = "ENF_COUNTERS";
    /// Per-CPU, per-scope record budgets (see [`crate::RECORDS_PER_SECOND`]).
    pub const RECORD_BUDGETS: &str = "ENF_RECORD_BUDGETS";
    /// Element 0: the DNS proxy's addresses ([`crate::DnsConfig`]); all zero while it is off.
    pub const DNS_CONFIG: &str = "ENF_DNS_CONFIG";
    /// DNS server address (IPv4-mapped) to its upstream index: the servers whose port-53
    /// traffic the proxy may take.
    pub const DNS_UPSTREAMS: &str = "ENF_DNS_UPSTREAMS";
    /// Upstream index to address, so that replies read as coming from the server asked.
    pub const DNS_UPSTREAM_ADDRS: &str = "ENF_DNS_UPSTREAM_ADDRS";
    /// Scope id to the scope's proxy slot: the last byte of the proxy address it is sent to.
    pub const DNS_SLOTS: &str = "ENF_DNS_SLOTS";
    /// The proxy's sockets, at [`crate::dns_socket_index`]: a query is redirected only to a
    /// socket that exists, so a dead proxy means direct DNS at once.
    pub const DNS_SOCKS: &str = "ENF_DNS_SOCKS";
    /// Addresses learned from workloads' DNS answers, with their expiry.
    pub const LEARNED: &str = "ENF_ALLOW_LEARNED";
    /// Cgroups whose DNS is never redirected (pods whose DNS an Istio sidecar or ztunnel
    /// captures), with their subtrees.
    pub const DNS_SKIP: &str = "ENF_DNS_SKIP";
    /// Destinations a VirtualService routes through an egress gateway, per scope: the
    /// gateway's addresses ([`crate::Redirect`]).
    pub const REDIRECTS: &str = "ENF_REDIRECTS";
    /// Per-CPU verdict counters, per scope, at [`crate::verdict_slot`].
    pub const VERDICTS: &str = "ENF_VERDICTS";
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
    /// `cgroup/sock_create`: socket types and protocols the address hooks cannot judge.
    pub const SOCK_CREATE: &str = "enforcer_sock_create";
    /// `cgroup/setsockopt`: source routes.
    pub const SETSOCKOPT: &str = "enforcer_setsockopt";
    /// `cgroup_skb/egress`: IP options and routing headers that control messages add.
    pub const SKB_EGRESS: &str = "enforcer_skb_egress";
    /// `cgroup/recvmsg4` and `cgroup/getpeername4`: a reply of the DNS proxy reads as the
    /// server's.
    pub const RECVMSG4: &str = "enforcer_recvmsg4";
    pub const GETPEERNAME4: &str = "enforcer_getpeername4";
    /// `cgroup/bind4` and `bind6`: only the agent binds the proxy's addresses.
    pub const BIND4: &str = "enforcer_bind4";
    pub const BIND6: &str = "enforcer_bind6";
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
    pub const SOCK_CREATE: u8 = 6;
    pub const SETSOCKOPT: u8 = 7;
    /// The cgroup's packets on their way out (`cgroup_skb/egress`).
    pub const SKB_EGRESS: u8 = 8;
}

/// Why a record was made, carried by [`DenyEvent::reason`]: a stable code beside the verdict.
pub mod reason {
    /// No rule of the scope allows the destination.
    pub const NO_RULE: u8 = 0;
    /// A socket type or protocol the scope's policy cannot judge ([`DenyEvent::port`] holds
    /// the protocol, [`DenyEvent::sock_type`] the type).
    pub const SOCKET_TYPE: u8 = 1;
    /// An IPv4 source route or options, or an IPv6 routing header: the first hop would not be
    /// the judged destination ([`DenyEvent::port`] holds the option name where there is one).
    pub const SOURCE_ROUTE: u8 = 2;
    /// A packet on a pod's veth whose source is not one of that pod's addresses.
    pub const SPOOFED_SOURCE: u8 = 3;
    /// A frame that is neither IPv4, IPv6 nor ARP (a VLAN tag, another ethertype).
    pub const NOT_IP: u8 = 4;
    /// A packet on the wire to a loopback address.
    pub const LOOPBACK: u8 = 5;
    /// A fragment whose first fragment was not seen, or headers that could not be walked.
    pub const UNJUDGEABLE: u8 = 6;
    /// A packet on a veth the agent registered no pod for.
    pub const UNKNOWN_VETH: u8 = 7;
    /// A destination a VirtualService routes through an egress gateway, reached around it (a
    /// packet that was not redirected, or any port of it under `--egress-gateway-only`).
    pub const GATEWAY_BYPASS: u8 = 8;
    /// A destination routed through an egress gateway that the kernel cannot take there: the
    /// client would have to originate TLS, or the gateway has no address of that family.
    pub const GATEWAY_REFUSED: u8 = 9;
}

/// Indexes of the per-CPU `COUNTERS` array.
pub mod counter {
    /// Records lost because the ring buffer was full (the agent is slow or down).
    pub const RING_FULL: u32 = 0;
    /// Records not made because their scope spent its budget ([`crate::RECORDS_PER_SECOND`]).
    pub const RATE_LIMITED: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// Scopes with verdict counters of their own; higher ids share the last one's.
pub const VERDICT_SCOPES: u32 = 4096;

/// Counters per scope in `VERDICTS`: a verdict of [`verdict_count`], by the socket hooks (the
/// first four) or by TC on a new flow (the next four).
pub const VERDICT_SLOTS: u32 = 8;

/// Verdicts as the counters tell them apart.
pub mod verdict_count {
    pub const ALLOWED: u32 = 0;
    pub const DENIED: u32 = 1;
    pub const AUDIT: u32 = 2;
    pub const REVOKED: u32 = 3;
    /// Added to the verdict for TC's judgements.
    pub const TC: u32 = 4;
}

/// Where `scope`'s counter of `slot` (a [`verdict_count`] value, plus `TC` for TC) is.
pub const fn verdict_slot(scope: u32, slot: u32) -> u32 {
    let scope = if scope < VERDICT_SCOPES {
        scope
    } else {
        VERDICT_SCOPES - 1
    };
    scope * VERDICT_SLOTS + slot
}

/// Records one scope may make per second on one CPU; the rest are only counted, so that one
/// workload's retry loop cannot drown the others' records.
pub const RECORDS_PER_SECOND: u32 = 200;

/// IP protocol numbers as they appear in keys.
pub mod proto {
    pub const ANY: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
    pub const UDPLITE: u8 = 136;
}

/// Bits of [`TcConfig::flags`] (read by the connect hooks too).
pub mod tc_flags {
    /// Judge ICMP like other traffic (no ServiceEntry allows it); otherwise it passes.
    pub const JUDGE_ICMP: u32 = 1;
    /// `CG_TREES` is in use: the connect hooks look for a claimed ancestor of an unclaimed
    /// cgroup (Kubernetes mode).
    pub const CG_TREES: u32 = 2;
    /// Socket kinds that enforced scopes may create anyway (`--allow-sockets`); each is
    /// refused by default, as no ServiceEntry can be judged for it at connect time.
    pub const ALLOW_RAW: u32 = 1 << 2;
    pub const ALLOW_PING: u32 = 1 << 3;
    pub const ALLOW_SCTP: u32 = 1 << 4;
    pub const ALLOW_UDPLITE: u32 = 1 << 5;
    pub const ALLOW_MPTCP: u32 = 1 << 6;
    /// Other protocols of `AF_INET`/`AF_INET6` sockets.
    pub const ALLOW_OTHER: u32 = 1 << 7;
    /// `REDIRECTS` has entries: only then do the hooks look there.
    pub const REDIRECTS: u32 = 1 << 8;
    /// `--egress-gateway-only`: `REDIRECTS` also holds port-0, protocol-0 entries that refuse
    /// every other port and protocol of a gateway-routed address.
    pub const GATEWAY_ONLY: u32 = 1 << 9;
}

/// Values of [`Redirect::action`].
pub mod redirect {
    /// Rewrite `connect()` to one of the targets.
    pub const TO_GATEWAY: u32 = 1;
    /// Refuse: the kernel cannot do what the route asks (see [`crate::reason::GATEWAY_REFUSED`]).
    pub const REFUSE: u32 = 2;
    /// Refuse every port and protocol but the routed ones (`--egress-gateway-only`).
    pub const GATEWAY_ONLY: u32 = 3;
}

/// Gateway endpoints one redirect picks from, at random, as Cilium's socket LB does.
pub const MAX_REDIRECT_TARGETS: usize = 8;

/// Value of `REDIRECTS`, keyed by the [`PolicyKey`] of the original destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// IPv4 is IPv4-mapped. Targets of an IPv4 destination are IPv4.
    pub addrs: [[u8; 16]; MAX_REDIRECT_TARGETS],
    /// Host byte order.
    pub ports: [u16; MAX_REDIRECT_TARGETS],
    /// Targets in use, 1 to [`MAX_REDIRECT_TARGETS`] for [`redirect::TO_GATEWAY`].
    pub count: u32,
    /// One of [`redirect`].
    pub action: u32,
}
const _: () = assert!(core::mem::size_of::<Redirect>() == 152);

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
    /// One of [`reason`].
    pub reason: u8,
    /// The socket type, for [`reason::SOCKET_TYPE`] records.
    pub sock_type: u8,
    pub pad: u8,
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
    /// Padding as two fields, not `[u8; 3]`: a three-byte array is zeroed with a call to
    /// `memset`, after which the BPF verifier finds registers unreadable.
    pub pad: u8,
    pub pad2: u16,
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

/// Value of `VETHS`: the addresses of the pod behind a veth. Unused slots are all zero, which is
/// never a pod's source address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VethPod {
    /// IPv4 is IPv4-mapped, as in [`PolicyKey`].
    pub addrs: [[u8; 16]; 2],
}
const _: () = assert!(core::mem::size_of::<VethPod>() == 32);

/// Key of `FRAGS`: one fragmented datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The IPv4 identification or the IPv6 fragment header's identification.
    pub id: u32,
    pub proto: u8,
    /// As in [`FlowKey`].
    pub pad: u8,
    pub pad2: u16,
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);

/// Value of `RECORD_BUDGETS`: records made in the current one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordBudget {
    pub window_start_ns: u64,
    pub used: u32,
    pub pad: u32,
}
const _: () = assert!(core::mem::size_of::<RecordBudget>() == 16);

/// Element 0 of `DNS_CONFIG`. A port-53 query to an upstream from a scope with a slot goes to
/// `prefix4.slot : port_base + upstream index`, where the agent's proxy listens.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsConfig {
    /// The first three bytes of the proxy's /24 (network order); the fourth is the slot.
    pub prefix4: [u8; 4],
    /// 0 while the proxy is off.
    pub port_base: u16,
    /// Upstreams in use: indexes `0..upstreams`.
    pub upstreams: u16,
    /// [`dns_flags`] bits.
    pub flags: u32,
    pub pad: u32,
    /// The agent's own cgroup: the only one that may bind or send from the proxy's addresses
    /// (with [`dns_flags::GUARD`]).
    pub agent_cgroup: u64,
}
const _: () = assert!(core::mem::size_of::<DnsConfig>() == 24);

/// Bits of [`DnsConfig::flags`].
pub mod dns_flags {
    /// `DNS_SKIP` has entries: the hooks look the caller's cgroups up there.
    pub const SKIPS: u32 = 1;
    /// `agent_cgroup` is known: no other cgroup may bind an address of the prefix or send
    /// from one, so that nothing else can pass as the proxy (whose replies read as the DNS
    /// server's).
    pub const GUARD: u32 = 2;
}

/// Upstreams the proxy may serve; their indexes fit in [`dns_socket_index`].
pub const DNS_MAX_UPSTREAMS: u16 = 16;

/// Capacity of `DNS_SOCKS`: every slot (a byte) times every upstream, UDP and TCP.
pub const DNS_SOCKS_CAPACITY: u32 = 256 * DNS_MAX_UPSTREAMS as u32 * 2;

/// Where the proxy's socket for `slot`, upstream `idx` and protocol sits in `DNS_SOCKS`.
pub const fn dns_socket_index(slot: u8, idx: u16, tcp: bool) -> u32 {
    (slot as u32) * (DNS_MAX_UPSTREAMS as u32) * 2 + (idx as u32) * 2 + tcp as u32
}

/// Value of `LEARNED`: until when (`CLOCK_BOOTTIME`, which the kernel checks itself, so that a
/// dead or hung agent can never extend it) and for which name the address was learned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Learned {
    pub expires_ns: u64,
    /// The agent's id of the name asked, for reports.
    pub name_id: u32,
    pub pad: u32,
}
const _: () = assert!(core::mem::size_of::<Learned>() == 16);

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
    unsafe impl aya::Pod for super::VethPod {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::RecordBudget {}
    unsafe impl aya::Pod for super::Redirect {}
    unsafe impl aya::Pod for super::DnsConfig {}
    unsafe impl aya::Pod for super::Learned {}
}
