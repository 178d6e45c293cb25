//! Egress enforcement at `connect()` and `sendmsg()` for cgroup v2, and per packet on pod
//! veths (`tc.rs`).
//!
//! Each hook returns 1 to allow and 0 to refuse (the syscall then fails with EPERM). A cgroup that
//! no scope claims is not enforced.
#![no_std]
#![no_main]

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id},
    macros::{cgroup_sock_addr, map},
    maps::{lpm_trie::Key, HashMap, LpmTrie},
    programs::SockAddrContext,
};
use enforcer_common::{
    hook, ipv4_mapped, mode, proto, reason, redirect, tc_flags, verdict, verdict_count,
    CgroupScope, PolicyKey, ScopeName, GLOBAL_SCOPE, POLICY_KEY_HEADER_BITS,
};

mod dns;
mod gateway;
mod packet;
mod records;
mod skb;
mod sock;
mod tc;

use records::{report, Record};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const AF_UNSPEC: u32 = 0;

#[map(name = "ENF_CGROUPS")]
static CGROUPS: HashMap<u64, CgroupScope> = HashMap::pinned(65_536, 0);

/// Cgroups that claim their whole subtree (Kubernetes pods, the kubelet's root for pods not
/// mapped yet, and local mode's cgroups). The deepest claimed ancestor decides.
#[map(name = "ENF_CG_TREES")]
static CG_TREES: HashMap<u64, CgroupScope> = HashMap::pinned(65_536, 0);

/// Deepest cgroup level searched for a claimed ancestor.
const MAX_TREE_LEVEL: i32 = 24;

#[map(name = "ENF_ALLOW_EXACT")]
static ALLOW_EXACT: HashMap<PolicyKey, u32> = HashMap::pinned(131_072, 0);

#[map(name = "ENF_ALLOW_CIDR")]
static ALLOW_CIDR: LpmTrie<PolicyKey, u32> = LpmTrie::pinned(65_536, BPF_F_NO_PREALLOC);

// Written only by the agent; declared here so that it is created and pinned with the others.
#[map(name = "ENF_SCOPE_NAMES")]
static SCOPE_NAMES: HashMap<ScopeName, u32> = HashMap::pinned(65_536, 0);

#[cgroup_sock_addr(connect4)]
pub fn enforcer_connect4(ctx: SockAddrContext) -> i32 {
    decide::<false>(&ctx, hook::CONNECT4)
}

#[cgroup_sock_addr(connect6)]
pub fn enforcer_connect6(ctx: SockAddrContext) -> i32 {
    decide::<true>(&ctx, hook::CONNECT6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn enforcer_sendmsg4(ctx: SockAddrContext) -> i32 {
    // A datagram from an address of the DNS proxy (IP_PKTINFO) would pass as the proxy's
    // reply, whoever sends it: only the agent may send one.
    // SAFETY: sendmsg4 may read msg_src_ip4 with a 4-byte load.
    let src = unsafe { read_volatile(&(*ctx.sock_addr).msg_src_ip4) };
    if dns::foreign_proxy_source(src.to_ne_bytes()) {
        return DENY;
    }
    decide::<false>(&ctx, hook::SENDMSG4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn enforcer_sendmsg6(ctx: SockAddrContext) -> i32 {
    decide::<true>(&ctx, hook::SENDMSG6)
}

fn decide<const V6: bool>(ctx: &SockAddrContext, hook: u8) -> i32 {
    match try_decide::<V6>(ctx, hook) {
        Ok(verdict) => verdict,
        // Only reachable for an enforced cgroup: fail closed.
        Err(()) => DENY,
    }
}

// V6 is a const so that each program reads only its own context fields, at fixed offsets: the
// verifier refuses context loads through a computed pointer.
#[inline(always)]
fn try_decide<const V6: bool>(ctx: &SockAddrContext, hook: u8) -> Result<i32, ()> {
    // SAFETY: the helper has no preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let scope = current_scope(cgroup_id);
    if scope.mode == UNCLAIMED {
        return Ok(ALLOW);
    }
    // Redirects apply in every mode, as Istio's mesh routes do; without any, ALLOW_ANY
    // costs nothing more.
    let flags = tc::config().flags;
    if scope.mode == mode::ALLOW_ANY && flags & tc_flags::REDIRECTS == 0 {
        return Ok(allow(&scope));
    }

    let sa = ctx.sock_addr;
    // SAFETY: the kernel provides a valid bpf_sock_addr for this program type; each field is
    // read once with a 4-byte load, as the verifier requires.
    // A connected UDP socket whose sendmsg carries a control message (IP_TOS, IP_PKTINFO,
    // IPV6_TCLASS) comes here with no address at all: judge where the socket is connected.
    // SAFETY: as below.
    let unspec = unsafe { read_volatile(&(*sa).user_family) } == AF_UNSPEC;
    let (addr, user_port, protocol) = unsafe {
        if unspec {
            let sk = read_volatile(&(*sa).__bindgen_anon_1.sk);
            let addr = if V6 {
                ipv6_bytes([
                    read_volatile(&(*sk).dst_ip6[0]),
                    read_volatile(&(*sk).dst_ip6[1]),
                    read_volatile(&(*sk).dst_ip6[2]),
                    read_volatile(&(*sk).dst_ip6[3]),
                ])
            } else {
                ipv4_mapped(read_volatile(&(*sk).dst_ip4).to_ne_bytes())
            };
            // dst_port is the port in network byte order, as user_port's low 16 bits are.
            let port = u32::from(read_volatile(&(*sk).dst_port));
            (addr, port, read_volatile(&(*sa).protocol))
        } else {
            let addr = if V6 {
                ipv6_bytes([
                    read_volatile(&(*sa).user_ip6[0]),
                    read_volatile(&(*sa).user_ip6[1]),
                    read_volatile(&(*sa).user_ip6[2]),
                    read_volatile(&(*sa).user_ip6[3]),
                ])
            } else {
                ipv4_mapped(read_volatile(&(*sa).user_ip4).to_ne_bytes())
            };
            (
                addr,
                read_volatile(&(*sa).user_port),
                read_volatile(&(*sa).protocol),
            )
        }
    };
    // The port in network byte order, in the low 16 bits.
    let port = u16::from_be(user_port as u16);
    let proto = protocol as u8;

    let key = PolicyKey {
        scope: scope.scope,
        port,
        proto,
        pad: 0,
        addr,
    };
    if let Some(r) = gateway::lookup(&key, flags) {
        return through_gateway::<V6>(ctx, &scope, cgroup_id, key, hook, r);
    }
    if scope.mode == mode::ALLOW_ANY {
        return Ok(allow(&scope));
    }
    if allowed(&key, false) {
        // A connected socket's address is not this call's to change.
        if !V6 && !unspec {
            dns::redirect4(ctx, cgroup_id, &scope, &key);
        }
        return Ok(allow(&scope));
    }
    refuse(&scope, cgroup_id, key, hook, reason::NO_RULE, 0)
}

/// A `connect()` to a destination routed through an egress gateway goes to the gateway; any
/// other use of it (a datagram, another port under `--egress-gateway-only`, a route the kernel
/// cannot take) is refused.
#[inline(always)]
fn through_gateway<const V6: bool>(
    ctx: &SockAddrContext,
    scope: &CgroupScope,
    cgroup_id: u64,
    key: PolicyKey,
    hook: u8,
    r: &enforcer_common::Redirect,
) -> Result<i32, ()> {
    let connect = hook == hook::CONNECT4 || hook == hook::CONNECT6;
    if r.action == redirect::TO_GATEWAY && connect {
        if V6 {
            gateway::rewrite6(ctx, r)?;
        } else {
            gateway::rewrite4(ctx, r)?;
        }
        return Ok(allow(scope));
    }
    let why = if r.action == redirect::REFUSE {
        reason::GATEWAY_REFUSED
    } else {
        reason::GATEWAY_BYPASS
    };
    refuse(scope, cgroup_id, key, hook, why, 0)
}

/// An IPv6 address from the four 32-bit words a context holds it in (network byte order).
#[inline(always)]
fn ipv6_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut a = [0u8; 16];
    for (chunk, word) in a.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    a
}

/// Reports a refusal by a socket hook and gives its verdict: AUDIT only reports.
#[inline(always)]
fn refuse(
    scope: &CgroupScope,
    cgroup_id: u64,
    key: PolicyKey,
    hook: u8,
    why: u8,
    sock_type: u8,
) -> Result<i32, ()> {
    let record = Record {
        cgroup_id,
        key,
        hook,
        verdict: refusal(scope),
        reason: why,
        sock_type,
    };
    report::<true>(scope, record);
    if scope.mode == mode::AUDIT {
        records::count_verdict(scope.scope, verdict_count::AUDIT);
        Ok(ALLOW)
    } else {
        records::count_verdict(scope.scope, verdict_count::DENIED);
        Ok(DENY)
    }
}

/// An allowed connection or datagram of an enforced scope, counted.
#[inline(always)]
fn allow(scope: &CgroupScope) -> i32 {
    records::count_verdict(scope.scope, verdict_count::ALLOWED);
    ALLOW
}

/// [`CgroupScope::mode`] of a cgroup no scope claims: it is not enforced. Modes start at 1.
const UNCLAIMED: u32 = 0;

/// The current task's cgroup's scope (see [`scope_of`]).
#[inline(always)]
fn current_scope(cgroup_id: u64) -> CgroupScope {
    // SAFETY: the helper has no preconditions; it returns 0 below the current cgroup.
    scope_of(cgroup_id, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level)
    })
}

/// The cgroup's own entry, else its deepest claimed ancestor's (`ancestor(level)` gives the
/// ancestor's id at that level, 0 below the cgroup), else [`UNCLAIMED`].
///
/// No `Option` here: kernels before 6.1.191 (Debian 12's 6.1.176 among them) refuse a read of
/// a stack slot that was only partly written, which an `Option<CgroupScope>` left `None` is
/// (CVE-2023-52452 changed that). Every byte of the result is written before it is read.
#[inline(always)]
fn scope_of(cgroup_id: u64, ancestor: impl Fn(i32) -> u64) -> CgroupScope {
    // SAFETY: the value is copied out at once; the agent only ever replaces whole values.
    if let Some(scope) = unsafe { CGROUPS.get(cgroup_id) } {
        return *scope;
    }
    let mut found = CgroupScope {
        scope: 0,
        mode: UNCLAIMED,
    };
    // Without claimed subtrees, unclaimed cgroups skip the walk.
    if tc::config().flags & tc_flags::CG_TREES == 0 {
        return found;
    }
    let mut level = 1;
    while level <= MAX_TREE_LEVEL {
        let id = ancestor(level);
        if id == 0 {
            break;
        }
        // SAFETY: as above.
        if let Some(scope) = unsafe { CG_TREES.get(id) } {
            found.scope = scope.scope;
            found.mode = scope.mode;
        }
        if id == cgroup_id {
            break;
        }
        level += 1;
    }
    found
}

/// Whether the allow maps let `key` through; last, an address learned from a DNS answer, which
/// a flow allowed before (`was_allowed`) keeps after its expiry (see [`dns::learned`]).
fn allowed(key: &PolicyKey, was_allowed: bool) -> bool {
    // SAFETY: lookups only; the value is not dereferenced.
    if unsafe { ALLOW_EXACT.get(key) }.is_some() {
        return true;
    }
    let full = POLICY_KEY_HEADER_BITS + 128;
    if ALLOW_CIDR.get(Key::new(full, *key)).is_some() {
        return true;
    }
    let global = PolicyKey {
        scope: GLOBAL_SCOPE,
        port: 0,
        proto: proto::ANY,
        pad: 0,
        addr: key.addr,
    };
    ALLOW_CIDR.get(Key::new(full, global)).is_some() || dns::learned(key, was_allowed)
}

/// What a refusal is reported as in this scope's mode.
fn refusal(scope: &CgroupScope) -> u8 {
    if scope.mode == mode::AUDIT {
        verdict::AUDIT
    } else {
        verdict::DENIED
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
