//! What the address hooks cannot judge, refused where a socket is made or configured.
//!
//! `connect()` and `sendmsg()` see TCP and UDP only, and judge the address given. Raw, ping,
//! SCTP, UDP-Lite and MPTCP sockets send without those hooks (MPTCP's extra subflows open
//! in the kernel to addresses the peer advertises), and a source route sends the packets to a
//! first hop that was never judged. In an enforced scope these are refused, each unless
//! `--allow-sockets` names it.

use core::ptr::read_volatile;

use aya_ebpf::{
    helpers::bpf_get_current_cgroup_id,
    macros::{cgroup_sock, cgroup_sockopt},
    programs::{SockContext, SockoptContext},
};
use enforcer_common::{hook, mode, reason, tc_flags, PolicyKey};

use crate::{current_scope, refuse, tc, ALLOW, UNCLAIMED};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: u32 = 3;
const SOCK_SEQPACKET: u32 = 5;

const IPPROTO_IP: u32 = 0;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const IPPROTO_ICMPV6: u32 = 58;
const IPPROTO_SCTP: u32 = 132;
const IPPROTO_UDPLITE: u32 = 136;
const IPPROTO_MPTCP: u32 = 262;

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const IP_OPTIONS: i32 = 4;
const IPV6_2292RTHDR: i32 = 5;
const IPV6_2292PKTOPTIONS: i32 = 6;
const IPV6_RTHDR: i32 = 57;
const PAGE_SIZE: i32 = 4096;

/// Runs for sockets that processes make (`AF_INET`, `AF_INET6`), not the kernel's own.
#[cgroup_sock(sock_create)]
pub fn enforcer_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the kernel provides a valid bpf_sock; family, type and protocol are readable.
    let (kind, protocol) = unsafe {
        (
            read_volatile(&(*ctx.sock).type_),
            read_volatile(&(*ctx.sock).protocol),
        )
    };
    let Some(flag) = needs_permission(kind, protocol) else {
        return ALLOW;
    };
    if tc::config().flags & flag != 0 {
        return ALLOW;
    }
    // SAFETY: the helper has no preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let scope = current_scope(cgroup_id);
    if scope.mode == UNCLAIMED || scope.mode == mode::ALLOW_ANY {
        return ALLOW;
    }
    let key = PolicyKey {
        scope: scope.scope,
        port: protocol as u16,
        proto: 0,
        pad: 0,
        addr: [0; 16],
    };
    refuse(
        &scope,
        cgroup_id,
        key,
        hook::SOCK_CREATE,
        reason::SOCKET_TYPE,
        kind as u8,
    )
    .unwrap_or(crate::DENY)
}

/// The `--allow-sockets` flag a socket needs, or `None` for TCP and UDP, which the address
/// hooks judge.
#[inline(always)]
fn needs_permission(kind: u32, protocol: u32) -> Option<u32> {
    match (kind, protocol) {
        (SOCK_STREAM, IPPROTO_IP | IPPROTO_TCP) | (SOCK_DGRAM, IPPROTO_IP | IPPROTO_UDP) => None,
        (SOCK_RAW, _) => Some(tc_flags::ALLOW_RAW),
        (SOCK_DGRAM, IPPROTO_ICMP | IPPROTO_ICMPV6) => Some(tc_flags::ALLOW_PING),
        (SOCK_STREAM | SOCK_SEQPACKET, IPPROTO_SCTP) => Some(tc_flags::ALLOW_SCTP),
        (SOCK_DGRAM, IPPROTO_UDPLITE) => Some(tc_flags::ALLOW_UDPLITE),
        (SOCK_STREAM, IPPROTO_MPTCP) => Some(tc_flags::ALLOW_MPTCP),
        _ => Some(tc_flags::ALLOW_OTHER),
    }
}

/// Refuses source routes: `IP_OPTIONS` (LSRR, SSRR need no privilege) and the IPv6 routing
/// header options. The same options in a control message are caught on the way out
/// (`skb.rs`).
#[cgroup_sockopt(setsockopt)]
pub fn enforcer_setsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: the kernel provides a valid bpf_sockopt; these fields are readable.
    let (level, name, len) = unsafe {
        (
            read_volatile(&(*ctx.sockopt).level),
            read_volatile(&(*ctx.sockopt).optname),
            read_volatile(&(*ctx.sockopt).optlen),
        )
    };
    let routes = match level {
        SOL_IP => name == IP_OPTIONS,
        SOL_IPV6 => matches!(name, IPV6_RTHDR | IPV6_2292RTHDR | IPV6_2292PKTOPTIONS),
        _ => false,
    };
    if !routes || len <= 0 {
        // Larger values than a page reach the program cut short; an optlen of 0 tells the
        // kernel to use the caller's buffer as it is (older kernels fail it otherwise).
        if len > PAGE_SIZE {
            // SAFETY: optlen is writable for this program type.
            unsafe { (*ctx.sockopt).optlen = 0 };
        }
        // An empty value clears the options: nothing to refuse.
        return ALLOW;
    }
    // SAFETY: the helper has no preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let scope = current_scope(cgroup_id);
    if scope.mode == UNCLAIMED || scope.mode == mode::ALLOW_ANY {
        return ALLOW;
    }
    let key = PolicyKey {
        scope: scope.scope,
        port: name as u16,
        proto: level as u8,
        pad: 0,
        addr: [0; 16],
    };
    refuse(
        &scope,
        cgroup_id,
        key,
        hook::SETSOCKOPT,
        reason::SOURCE_ROUTE,
        0,
    )
    .unwrap_or(crate::DENY)
}
