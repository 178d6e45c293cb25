//! Egress gateways: a VirtualService bound to `mesh` routes a host's port through a gateway,
//! so `connect()` to that address is rewritten to the gateway, whose proxy then sees the
//! application's own Host header or TLS SNI. Whatever reaches the address another way (a
//! packet TC sees that was not rewritten) is a bypass, refused.

use aya_ebpf::{
    helpers::bpf_get_prandom_u32, macros::map, maps::HashMap, programs::SockAddrContext,
};
use enforcer_common::{proto, tc_flags, PolicyKey, Redirect, MAX_REDIRECT_TARGETS};

#[map(name = "ENF_REDIRECTS")]
static REDIRECTS: HashMap<PolicyKey, Redirect> = HashMap::pinned(16_384, 0);

/// The redirect for `key`, if its destination is routed through a gateway: the port's own
/// entry, else (`--egress-gateway-only`) the address's entry for every port and protocol.
#[inline(always)]
pub fn lookup(key: &PolicyKey, flags: u32) -> Option<&'static Redirect> {
    if flags & tc_flags::REDIRECTS == 0 {
        return None;
    }
    if key.proto == proto::TCP {
        // SAFETY: the agent only ever replaces whole values.
        if let Some(r) = unsafe { REDIRECTS.get(key) } {
            return Some(r);
        }
    }
    if flags & tc_flags::GATEWAY_ONLY == 0 {
        return None;
    }
    let any = PolicyKey {
        scope: key.scope,
        port: 0,
        proto: proto::ANY,
        pad: 0,
        addr: key.addr,
    };
    // SAFETY: as above.
    unsafe { REDIRECTS.get(any) }
}

/// One of the redirect's targets, at random.
#[inline(always)]
fn pick(r: &Redirect) -> Result<([u8; 16], u16), ()> {
    let count = r.count;
    if count == 0 {
        return Err(());
    }
    // SAFETY: the helper has no preconditions.
    let i = (unsafe { bpf_get_prandom_u32() } % count) as usize;
    if i >= MAX_REDIRECT_TARGETS {
        return Err(());
    }
    Ok((r.addrs[i], r.ports[i]))
}

/// Rewrites an IPv4 `connect()` to a target, which the agent makes IPv4 for IPv4 keys.
#[inline(always)]
pub fn rewrite4(ctx: &SockAddrContext, r: &Redirect) -> Result<(), ()> {
    let (addr, port) = pick(r)?;
    let ip = [addr[12], addr[13], addr[14], addr[15]];
    // SAFETY: connect4 may write user_ip4 and user_port.
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(ip);
        (*ctx.sock_addr).user_port = u32::from(port.to_be());
    }
    Ok(())
}

/// Rewrites an IPv6 `connect()`; an IPv4 target is written IPv4-mapped, which reaches it
/// unless the socket is `IPV6_V6ONLY` (then the connect fails, never going direct).
#[inline(always)]
pub fn rewrite6(ctx: &SockAddrContext, r: &Redirect) -> Result<(), ()> {
    let (addr, port) = pick(r)?;
    let word = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    // SAFETY: connect6 may write user_ip6 (word by word) and user_port.
    unsafe {
        (*ctx.sock_addr).user_ip6[0] = word(0);
        (*ctx.sock_addr).user_ip6[1] = word(4);
        (*ctx.sock_addr).user_ip6[2] = word(8);
        (*ctx.sock_addr).user_ip6[3] = word(12);
        (*ctx.sock_addr).user_port = u32::from(port.to_be());
    }
    Ok(())
}
