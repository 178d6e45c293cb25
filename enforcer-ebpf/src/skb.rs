//! Packets that a cgroup's sockets send, on their way out (`cgroup_skb/egress`, on the cgroup
//! root): the last look for workloads that have no TC judge (local mode, hostNetwork).
//!
//! Plain packets cost one header read. Only IPv4 options and IPv6 routing headers are judged:
//! a control message (`IP_RETOPTS`, `IPV6_RTHDR`) can add a source route to one datagram,
//! which `setsockopt` never sees, and the packet then goes to a first hop that was never
//! judged.

use aya_ebpf::{
    helpers::{bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use enforcer_common::{hook, ipv4_mapped, mode, reason, PolicyKey};

use crate::{
    packet::{walk_ipv6, NEXT_DSTOPTS, NEXT_HOP_BY_HOP, NEXT_ROUTING},
    refusal, report, scope_of, Record, ALLOW, DENY, UNCLAIMED,
};

#[cgroup_skb(egress)]
pub fn enforcer_skb_egress(ctx: SkBuffContext) -> i32 {
    match routed_to(&ctx) {
        Ok(Some(dst)) => judge(&ctx, dst),
        Ok(None) => ALLOW,
        // Too short for the header it announces: the stack never sends that.
        Err(()) => ALLOW,
    }
}

/// The packet's destination (its first hop), if the packet carries IPv4 options or an IPv6
/// routing header.
#[inline(always)]
fn routed_to(ctx: &SkBuffContext) -> Result<Option<[u8; 16]>, ()> {
    // A direct read of the first bytes costs no helper call per packet; the network header
    // is linear on the way out, and the helper reads it where it is not.
    // SAFETY: the context's own skb; data and data_end are readable by cgroup_skb programs.
    let (start, end) = unsafe {
        let skb = ctx.skb.skb;
        ((*skb).data as usize, (*skb).data_end as usize)
    };
    let (first, next) = if start + 7 <= end {
        // SAFETY: within [data, data_end), checked above.
        unsafe { (*(start as *const u8), *((start + 6) as *const u8)) }
    } else {
        let head: [u8; 7] = ctx.load(0).map_err(|_| ())?;
        (head[0], head[6])
    };
    match first >> 4 {
        4 if first & 0x0f > 5 => Ok(Some(ipv4_mapped(ctx.load(16).map_err(|_| ())?))),
        6 => {
            if !matches!(next, NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DSTOPTS) {
                return Ok(None);
            }
            let load8 = |off: usize| ctx.load::<[u8; 8]>(off).map_err(|_| ());
            let ext = walk_ipv6(next, 40, load8)?;
            if ext.routed || !ext.complete {
                Ok(Some(ctx.load(24).map_err(|_| ())?))
            } else {
                Ok(None)
            }
        }
        _ => Ok(None),
    }
}

fn judge(ctx: &SkBuffContext, dst: [u8; 16]) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: the helpers take the program's own skb.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(skb) };
    let scope = scope_of(cgroup_id, |level| unsafe {
        bpf_skb_ancestor_cgroup_id(skb, level)
    });
    if scope.mode == UNCLAIMED || scope.mode == mode::ALLOW_ANY {
        return ALLOW;
    }
    let record = Record {
        cgroup_id,
        key: PolicyKey {
            scope: scope.scope,
            port: 0,
            proto: 0,
            pad: 0,
            addr: dst,
        },
        hook: hook::SKB_EGRESS,
        verdict: refusal(&scope),
        reason: reason::SOURCE_ROUTE,
        sock_type: 0,
    };
    report::<false>(&scope, record);
    if scope.mode == mode::AUDIT {
        ALLOW
    } else {
        DENY
    }
}
