//! DNS-aware enforcement, the kernel's part. An allowed port-53 query from a scope that learns
//! is sent to the agent's proxy instead, at an address that says who asked (`prefix.slot`) and
//! which server was asked (the port); the reply reads as the server's. The proxy writes what an
//! answer teaches into `LEARNED` before the workload sees the answer, with an expiry the kernel
//! checks itself.
//!
//! A query is redirected only to a proxy socket that exists in `DNS_SOCKS`: when the agent dies,
//! the kernel closes its sockets, they leave the map, and the next query goes to the server
//! directly (nothing is learned then, which fails closed).

use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::{
        bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns, bpf_map_lookup_elem, bpf_sk_release,
    },
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap, SockMap},
    programs::SockAddrContext,
};
use enforcer_common::{
    dns_flags, dns_socket_index, proto, CgroupScope, DnsConfig, Learned, PolicyKey,
    DNS_MAX_UPSTREAMS, DNS_SOCKS_CAPACITY,
};

#[map(name = "ENF_DNS_CONFIG")]
static DNS_CONFIG: Array<DnsConfig> = Array::pinned(1, 0);

#[map(name = "ENF_DNS_UPSTREAMS")]
static DNS_UPSTREAMS: HashMap<[u8; 16], u32> = HashMap::pinned(DNS_MAX_UPSTREAMS as u32, 0);

#[map(name = "ENF_DNS_UPSTREAM_ADDRS")]
static DNS_UPSTREAM_ADDRS: Array<[u8; 16]> = Array::pinned(DNS_MAX_UPSTREAMS as u32, 0);

#[map(name = "ENF_DNS_SLOTS")]
static DNS_SLOTS: HashMap<u32, u32> = HashMap::pinned(4_096, 0);

#[map(name = "ENF_DNS_SOCKS")]
static DNS_SOCKS: SockMap = SockMap::pinned(DNS_SOCKS_CAPACITY, 0);

#[map(name = "ENF_DNS_SKIP")]
static DNS_SKIP: HashMap<u64, u32> = HashMap::pinned(16_384, 0);

#[map(name = "ENF_ALLOW_LEARNED")]
static LEARNED: HashMap<PolicyKey, Learned> = HashMap::pinned(65_536, BPF_F_NO_PREALLOC);

const DNS_PORT: u16 = 53;

/// Whether `key` was learned from an answer and has not expired. A flow the TC judge allowed
/// before (`was_allowed`) keeps an expired entry while the agent keeps it, so that connections
/// opened while it was valid go on (Cilium's "zombies"); new ones are refused at expiry.
#[inline(always)]
pub fn learned(key: &PolicyKey, was_allowed: bool) -> bool {
    // SAFETY: the value is read at once.
    match unsafe { LEARNED.get(key) } {
        // SAFETY: the helper has no preconditions.
        Some(l) => was_allowed || l.expires_ns > unsafe { bpf_ktime_get_boot_ns() },
        None => false,
    }
}

/// The slot of `scope`, if it learns and the proxy is on.
#[inline(always)]
fn slot_of(scope: u32) -> Option<u8> {
    // SAFETY: the value is read at once.
    unsafe { DNS_SLOTS.get(scope) }.map(|s| *s as u8)
}

#[inline(always)]
fn config() -> DnsConfig {
    DNS_CONFIG.get(0).copied().unwrap_or_default()
}

/// Sends an allowed IPv4 query to the proxy: rewrites the destination of `ctx` (connect4,
/// sendmsg4) when `key` is port 53 of an upstream, the scope has a slot, and the proxy's socket
/// for it is alive. Anything else goes where it was sent.
#[inline(always)]
pub fn redirect4(ctx: &SockAddrContext, cgroup_id: u64, scope: &CgroupScope, key: &PolicyKey) {
    if key.port != DNS_PORT || (key.proto != proto::UDP && key.proto != proto::TCP) {
        return;
    }
    let cfg = config();
    if cfg.port_base == 0 {
        return;
    }
    // SAFETY: the value is read at once.
    let Some(idx) = (unsafe { DNS_UPSTREAMS.get(key.addr) }).map(|i| *i as u16) else {
        return;
    };
    let Some(slot) = slot_of(scope.scope) else {
        return;
    };
    if idx >= cfg.upstreams || !alive(dns_socket_index(slot, idx, key.proto == proto::TCP)) {
        return;
    }
    if cfg.flags & dns_flags::SKIPS != 0 && skipped(cgroup_id) {
        return;
    }
    let p = cfg.prefix4;
    let addr = [p[0], p[1], p[2], slot];
    let port = (cfg.port_base + idx).to_be();
    // SAFETY: connect4 and sendmsg4 may write user_ip4 and user_port, with 4-byte stores.
    unsafe {
        let sa = ctx.sock_addr;
        (*sa).user_ip4 = u32::from_ne_bytes(addr);
        (*sa).user_port = u32::from(port);
    }
}

/// Whether the caller's cgroup, or an ancestor, is in `DNS_SKIP`.
#[inline(always)]
fn skipped(cgroup_id: u64) -> bool {
    // SAFETY: presence only.
    if unsafe { DNS_SKIP.get(cgroup_id) }.is_some() {
        return true;
    }
    let mut level = 1;
    while level <= crate::MAX_TREE_LEVEL {
        // SAFETY: the helper has no preconditions; it returns 0 below the current cgroup.
        let id = unsafe { aya_ebpf::helpers::bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 || id == cgroup_id {
            break;
        }
        // SAFETY: presence only.
        if unsafe { DNS_SKIP.get(id) }.is_some() {
            return true;
        }
        level += 1;
    }
    false
}

/// Whether the proxy socket at `index` exists (a closed socket leaves a SOCKMAP by itself).
#[inline(always)]
fn alive(index: u32) -> bool {
    let map = core::ptr::from_ref(&DNS_SOCKS).cast::<c_void>().cast_mut();
    let key = core::ptr::from_ref(&index).cast::<c_void>();
    // SAFETY: a SOCKMAP lookup returns a referenced socket or null; the reference is released
    // at once.
    unsafe {
        let sk = bpf_map_lookup_elem(map, key);
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk);
    }
    true
}

/// Whether a pod of `scope` may send `key` to the proxy: only to its own slot, on a proxy
/// port. Asked by the TC judge after the allow maps refused.
#[inline(always)]
pub fn to_own_proxy(scope: u32, key: &PolicyKey) -> bool {
    let cfg = config();
    let a = &key.addr;
    let v4 = a[..10] == [0; 10] && a[10] == 0xff && a[11] == 0xff;
    let p = cfg.prefix4;
    if cfg.port_base == 0 || !v4 || a[12] != p[0] || a[13] != p[1] || a[14] != p[2] {
        return false;
    }
    let ports = cfg.port_base..cfg.port_base + cfg.upstreams;
    let dns = key.proto == proto::UDP || key.proto == proto::TCP;
    dns && ports.contains(&key.port) && slot_of(scope) == Some(a[15])
}

/// Whether `addr` (network order) is one of the proxy's and the caller is not the agent: such a
/// bind, or a datagram sent from such a source (`IP_PKTINFO`), is refused, since a reply from
/// the prefix reads as the DNS server's.
#[inline(always)]
pub fn foreign_proxy_source(addr: [u8; 4]) -> bool {
    // Most sends name no source and most binds the wildcard: no map lookup for them.
    if addr == [0; 4] {
        return false;
    }
    let cfg = config();
    let p = cfg.prefix4;
    if cfg.flags & dns_flags::GUARD == 0 || addr[0] != p[0] || addr[1] != p[1] || addr[2] != p[2] {
        return false;
    }
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_get_current_cgroup_id() != cfg.agent_cgroup }
}

#[cgroup_sock_addr(bind4)]
pub fn enforcer_bind4(ctx: SockAddrContext) -> i32 {
    // SAFETY: bind4 may read user_ip4 with a 4-byte load.
    let ip = unsafe { read_volatile(&(*ctx.sock_addr).user_ip4) };
    i32::from(!foreign_proxy_source(ip.to_ne_bytes()))
}

#[cgroup_sock_addr(bind6)]
pub fn enforcer_bind6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: bind6 may read user_ip6 with 4-byte loads.
    let (w2, w3) = unsafe {
        (
            read_volatile(&(*sa).user_ip6[2]),
            read_volatile(&(*sa).user_ip6[3]),
        )
    };
    // SAFETY: as above.
    let w01 = unsafe { read_volatile(&(*sa).user_ip6[0]) | read_volatile(&(*sa).user_ip6[1]) };
    let mapped = w01 == 0 && w2.to_ne_bytes() == [0, 0, 0xff, 0xff];
    i32::from(!(mapped && foreign_proxy_source(w3.to_ne_bytes())))
}

/// A reply from the proxy reads as coming from the server the workload asked.
#[cgroup_sock_addr(recvmsg4)]
pub fn enforcer_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_server(&ctx);
    1
}

/// As [`enforcer_recvmsg4`], for a socket connected to the proxy.
#[cgroup_sock_addr(getpeername4)]
pub fn enforcer_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_server(&ctx);
    1
}

#[inline(always)]
fn restore_server(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: recvmsg4 and getpeername4 read and write user_ip4 and user_port with 4-byte
    // accesses.
    let (ip, port) = unsafe {
        (
            read_volatile(&(*sa).user_ip4),
            read_volatile(&(*sa).user_port),
        )
    };
    let cfg = config();
    let a = ip.to_ne_bytes();
    let p = cfg.prefix4;
    if cfg.port_base == 0 || a[0] != p[0] || a[1] != p[1] || a[2] != p[2] {
        return;
    }
    let port = u16::from_be(port as u16);
    if port < cfg.port_base || port >= cfg.port_base + cfg.upstreams {
        return;
    }
    let Some(server) = DNS_UPSTREAM_ADDRS.get(u32::from(port - cfg.port_base)) else {
        return;
    };
    let s = [server[12], server[13], server[14], server[15]];
    // SAFETY: as above.
    unsafe {
        (*sa).user_ip4 = u32::from_ne_bytes(s);
        (*sa).user_port = u32::from(DNS_PORT.to_be());
    }
}
