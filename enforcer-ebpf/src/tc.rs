//! Per-packet enforcement on the host side of a pod's veth, where ingress is the pod's egress.
//! It catches what connect() never sees (raw and packet sockets, flows opened before a
//! revocation), with the same allow maps. An established flow costs one LRU lookup until the
//! agent bumps the policy generation.
//!
//! The pod is the veth's (the agent registers each veth's pod addresses in `VETHS`), never
//! whatever the packet claims: a source that is not the pod's own is dropped, so spoofed
//! packets can neither pass as another pod's nor forge replies.
//!
//! The veth is shared with the CNI's own programs (its NetworkPolicy, anti-spoofing, NAT). A
//! packet these programs let through gets [`PASS`] (`TC_ACT_UNSPEC`, which is `TCX_NEXT`), so
//! the next program of the TCX chain, or the next legacy clsact filter, still runs; any other
//! verdict would end the chain. Only a refusal ends it, with `TC_ACT_SHOT`.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap},
    programs::TcContext,
};
use enforcer_common::{
    flow, hook, mode, proto, reason, redirect, tc_flags, verdict, verdict_count, CgroupScope,
    FlowKey, FlowVerdict, FragKey, PolicyKey, TcConfig, VethPod,
};

use crate::{
    allowed, dns, gateway,
    packet::{parse, Frame, Packet},
    records, refusal, report, Record,
};

#[map(name = "ENF_POD_SCOPES")]
static POD_SCOPES: HashMap<[u8; 16], CgroupScope> = HashMap::pinned(65_536, 0);

#[map(name = "ENF_VETHS")]
static VETHS: HashMap<u32, VethPod> = HashMap::pinned(65_536, 0);

#[map(name = "ENF_FLOWS")]
static FLOWS: LruHashMap<FlowKey, FlowVerdict> = LruHashMap::pinned(262_144, 0);

#[map(name = "ENF_REPLIES")]
static REPLIES: LruHashMap<FlowKey, u32> = LruHashMap::pinned(65_536, 0);

#[map(name = "ENF_REVOKED")]
static REVOKED: LruHashMap<FlowKey, u32> = LruHashMap::pinned(16_384, 0);

#[map(name = "ENF_FRAGS")]
static FRAGS: LruHashMap<FragKey, u32> = LruHashMap::pinned(16_384, 0);

#[map(name = "ENF_TC_CONFIG")]
static TC_CONFIG: Array<TcConfig> = Array::pinned(1, 0);

/// Not ours to decide: the next program runs (`TCX_NEXT` under TCX; the next filter under
/// legacy cls_bpf in direct-action mode).
const PASS: i32 = TC_ACT_UNSPEC;

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
/// Scope of records about packets no pod scope covers (an unregistered veth).
const NO_SCOPE: CgroupScope = CgroupScope {
    scope: 0,
    mode: mode::REGISTRY_ONLY,
};

/// The agent's settings and the policy generation.
#[inline(always)]
pub fn config() -> TcConfig {
    TC_CONFIG.get(0).copied().unwrap_or_default()
}

#[classifier]
pub fn enforcer_tc(ctx: TcContext) -> i32 {
    try_tc(&ctx).unwrap_or(TC_ACT_SHOT)
}

fn try_tc(ctx: &TcContext) -> Result<i32, ()> {
    // SAFETY: the context's own skb; these fields are readable by TC programs.
    let (ifindex, tagged) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).vlan_present) };
    let mut p = Packet::empty();
    p.ifindex = ifindex;
    match parse(ctx, &mut p)? {
        // A VLAN tag that the kernel took off before TC may hide another: the kernel strips
        // them after TC and delivers what is inside.
        Frame::Ip if tagged == 0 => {}
        Frame::Arp if tagged == 0 => return Ok(PASS),
        _ => {
            return Ok(drop_in(
                veth_scope(ifindex),
                ifindex,
                reason::NOT_IP,
                [0; 16],
            ))
        }
    }
    if link_control(&p) {
        return Ok(PASS);
    }
    // SAFETY: read in place; the agent only ever replaces whole values.
    let Some(pod) = (unsafe { VETHS.get(ifindex) }) else {
        return Ok(drop_unjudged(ifindex, reason::UNKNOWN_VETH, p.dst));
    };
    if !owns(pod, &p.src) || loopback(&p.dst) {
        // A loopback destination is never legitimate on a wire, and with route_localnet=1
        // (kube-proxy sets it) the node would deliver it to its own loopback services.
        let why = if owns(pod, &p.src) {
            reason::LOOPBACK
        } else {
            reason::SPOOFED_SOURCE
        };
        return Ok(drop_in(veth_scope(ifindex), ifindex, why, p.dst));
    }
    let config = config();
    // Routed packets, unwalked headers and later fragments are never cached: each is judged.
    let plain = !(p.routed || p.unwalked || p.frag.later);
    let icmp = p.proto == proto::ICMP || p.proto == proto::ICMPV6;
    if plain && icmp && config.flags & tc_flags::JUDGE_ICMP == 0 {
        return Ok(PASS);
    }
    let flow = FlowKey {
        src: p.src,
        dst: p.dst,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        pad: 0,
        pad2: 0,
    };
    // An established flow costs this one lookup, after the veth's.
    // Whether the flow was allowed before (a refusal now is a revocation). Not an `Option`:
    // LLVM spills a `None`'s unwritten payload, which the verifier refuses to read.
    let mut was_allowed = false;
    if plain {
        // SAFETY: the value is copied out at once.
        if let Some(c) = unsafe { FLOWS.get(flow) } {
            if c.allowed == flow::REPLY || c.generation == config.generation {
                let verdict = c.allowed;
                remember_first_fragment(&p, verdict);
                return Ok(action(verdict));
            }
            was_allowed = c.allowed == flow::ALLOWED;
        }
    }
    Ok(judge(&p, flow, was_allowed, &config))
}

/// The verdict of a packet no cached verdict covers, cached in turn (plain packets), and
/// reported when it refuses.
#[inline(always)]
fn judge(p: &Packet, flow: FlowKey, was_allowed: bool, config: &TcConfig) -> i32 {
    let generation = config.generation;
    // SAFETY: the value is copied out at once.
    let Some(scope) = (unsafe { POD_SCOPES.get(p.src) }).copied() else {
        // A pod this agent does not enforce.
        return PASS;
    };
    let key = PolicyKey {
        scope: scope.scope,
        port: p.dport,
        proto: p.proto,
        pad: 0,
        addr: p.dst,
    };
    // A packet to a gateway-routed destination was not redirected at connect: a bypass, in
    // every mode.
    if let Some(r) = gateway::lookup(&key, config.flags) {
        let why = if r.action == redirect::REFUSE {
            reason::GATEWAY_REFUSED
        } else {
            reason::GATEWAY_BYPASS
        };
        return refuse_flow(p, &scope, flow, &key, was_allowed, generation, why);
    }
    let enforced = scope.mode != mode::ALLOW_ANY;
    if enforced && (p.routed || p.unwalked) {
        let why = if p.routed {
            reason::SOURCE_ROUTE
        } else {
            reason::UNJUDGEABLE
        };
        return refuse(&scope, &key, refusal(&scope), why, p.ifindex);
    }
    if p.frag.later {
        return if enforced {
            later_fragment(p, &scope, &key)
        } else {
            PASS
        };
    }
    let ok = !enforced || allowed(&key, was_allowed) || dns::to_own_proxy(scope.scope, &key);
    // The reply side of a connection a peer opened, which policy alone would refuse: kept where
    // the pod's own flows cannot evict it, and cached again. Asked only after a refusal, so
    // that allowed new flows pay nothing for it.
    // SAFETY: only presence is checked.
    if !ok && unsafe { REPLIES.get(flow) }.is_some() {
        let reply = FlowVerdict {
            generation: 0,
            allowed: flow::REPLY,
        };
        let _ = FLOWS.insert(flow, reply, 0);
        remember_first_fragment(p, flow::REPLY);
        return PASS;
    }
    if !ok {
        return refuse_flow(
            p,
            &scope,
            flow,
            &key,
            was_allowed,
            generation,
            reason::NO_RULE,
        );
    }
    records::count_verdict(scope.scope, verdict_count::TC + verdict_count::ALLOWED);
    let _ = FLOWS.insert(
        flow,
        FlowVerdict {
            generation,
            allowed: flow::ALLOWED,
        },
        0,
    );
    remember_first_fragment(p, flow::ALLOWED);
    PASS
}

/// Refuses a flow and caches the refusal, as the judge does for a flow no rule allows; one that
/// was allowed before is revoked.
#[inline(always)]
fn refuse_flow(
    p: &Packet,
    scope: &CgroupScope,
    flow: FlowKey,
    key: &PolicyKey,
    was_allowed: bool,
    generation: u32,
    why: u8,
) -> i32 {
    let verdict = if scope.mode == mode::AUDIT {
        flow::AUDITED
    } else {
        flow::REFUSED
    };
    let _ = FLOWS.insert(
        flow,
        FlowVerdict {
            generation,
            allowed: verdict,
        },
        0,
    );
    remember_first_fragment(p, verdict);
    let record = if was_allowed && verdict == flow::REFUSED {
        // Kept apart: the pod cannot evict it by making new flows and then have the peer
        // reopen the flow as a reply.
        let _ = REVOKED.insert(flow, 1, 0);
        verdict::REVOKED
    } else {
        refusal(scope)
    };
    let counted = match record {
        verdict::REVOKED => verdict_count::REVOKED,
        verdict::AUDIT => verdict_count::AUDIT,
        _ => verdict_count::DENIED,
    };
    records::count_verdict(scope.scope, verdict_count::TC + counted);
    report::<false>(scope, tc_record(key, record, why, p.ifindex));
    action(verdict)
}

/// Neighbour discovery and multicast listener reports, which IPv6 needs on the link: only
/// with the hop limit that keeps them on it (255 for ND, which receivers check; 1 for MLD)
/// and towards link-local or multicast addresses, so they cannot carry data anywhere else.
#[inline(always)]
fn link_control(p: &Packet) -> bool {
    if p.proto != proto::ICMPV6 || !p.has_l4 {
        return false;
    }
    let on_link = p.dst[0] == 0xff || (p.dst[0] == 0xfe && p.dst[1] & 0xc0 == 0x80);
    let nd = (133..=137).contains(&p.icmp_type) && p.hop_limit == 255;
    let mld = matches!(p.icmp_type, 130..=132 | 143) && p.hop_limit == 1;
    on_link && (nd || mld)
}

#[inline(always)]
fn owns(pod: &VethPod, src: &[u8; 16]) -> bool {
    // All zero is never a pod's source (and marks an unused slot).
    *src != [0; 16] && (pod.addrs[0] == *src || pod.addrs[1] == *src)
}

/// 127.0.0.0/8 (IPv4-mapped) and ::1.
#[inline(always)]
fn loopback(dst: &[u8; 16]) -> bool {
    let v4 = dst[..10] == [0; 10] && dst[10] == 0xff && dst[11] == 0xff;
    let v6 = dst[..15] == [0; 15] && dst[15] == 1;
    (v4 && dst[12] == 127) || v6
}

/// A fragment after the first gets the first one's verdict; without one it is not judged.
#[inline(always)]
fn later_fragment(p: &Packet, scope: &CgroupScope, key: &PolicyKey) -> i32 {
    // SAFETY: the value is copied out at once.
    match unsafe { FRAGS.get(frag_key(p)) }.copied() {
        Some(verdict) => action(verdict),
        None => refuse(scope, key, refusal(scope), reason::UNJUDGEABLE, p.ifindex),
    }
}

#[inline(always)]
fn remember_first_fragment(p: &Packet, verdict: u32) {
    if p.frag.first {
        let _ = FRAGS.insert(frag_key(p), verdict, 0);
    }
}

#[inline(always)]
fn frag_key(p: &Packet) -> FragKey {
    FragKey {
        src: p.src,
        dst: p.dst,
        id: p.frag.id,
        proto: p.proto,
        pad: 0,
        pad2: 0,
    }
}

/// Records a refusal outside the flow cache; AUDIT lets the packet pass.
#[inline(always)]
fn refuse(scope: &CgroupScope, key: &PolicyKey, verdict: u8, why: u8, ifindex: u32) -> i32 {
    report::<false>(scope, tc_record(key, verdict, why, ifindex));
    if scope.mode == mode::AUDIT {
        PASS
    } else {
        TC_ACT_SHOT
    }
}

/// Drops what cannot be judged at all, whatever the pod's mode, with a record.
#[inline(always)]
fn drop_unjudged(ifindex: u32, why: u8, dst: [u8; 16]) -> i32 {
    drop_in(NO_SCOPE, ifindex, why, dst)
}

/// The scope of the pod behind a veth, for records about what it sent that no rule decided.
#[inline(always)]
fn veth_scope(ifindex: u32) -> CgroupScope {
    // SAFETY: both values are copied out at once.
    unsafe {
        match VETHS.get(ifindex) {
            Some(pod) => POD_SCOPES.get(pod.addrs[0]).copied().unwrap_or(NO_SCOPE),
            None => NO_SCOPE,
        }
    }
}

#[inline(always)]
fn drop_in(scope: CgroupScope, ifindex: u32, why: u8, dst: [u8; 16]) -> i32 {
    let key = PolicyKey {
        scope: scope.scope,
        port: 0,
        proto: 0,
        pad: 0,
        addr: dst,
    };
    report::<false>(&scope, tc_record(&key, verdict::DENIED, why, ifindex));
    TC_ACT_SHOT
}

#[inline(always)]
/// TC sees packets, not sockets: its records name the veth where a cgroup would be.
fn tc_record(key: &PolicyKey, verdict: u8, why: u8, ifindex: u32) -> Record {
    Record {
        cgroup_id: u64::from(ifindex),
        key: *key,
        hook: hook::TC,
        verdict,
        reason: why,
        sock_type: 0,
    }
}

/// On the host side's egress, which is the way into the pod. A connection that a peer opens to
/// the pod (TCP SYN, a UDP datagram, an echo request) lets the pod's replies pass, which egress
/// policy does not govern. It never drops.
#[classifier]
pub fn enforcer_reply(ctx: TcContext) -> i32 {
    let _ = note_inbound(&ctx);
    PASS
}

fn note_inbound(ctx: &TcContext) -> Result<(), ()> {
    // SAFETY: the context's own skb; ifindex is readable by TC programs.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // A hairpin (what the pod sent, turned around by the node) may open a reply: the judge
    // dropped anything whose source was not the pod's own on the way in, so it can only be the
    // pod talking to itself, or kube-proxy's masquerade of a Service that sends the pod back
    // to itself, which needs the reply.
    let mut p = Packet::empty();
    if parse(ctx, &mut p)? != Frame::Ip || !p.has_l4 {
        return Ok(());
    }
    let opens = match p.proto {
        proto::TCP => p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        proto::UDP => true,
        proto::ICMP => p.icmp_type == ICMP_ECHO_REQUEST,
        proto::ICMPV6 => p.icmp_type == ICMPV6_ECHO_REQUEST,
        _ => false,
    };
    if !opens {
        return Ok(());
    }
    // SAFETY: the value is copied out at once.
    match unsafe { VETHS.get(ifindex) } {
        Some(pod) if owns(pod, &p.dst) => {}
        _ => return Ok(()),
    }
    let reply = FlowKey {
        src: p.dst,
        dst: p.src,
        sport: p.dport,
        dport: p.sport,
        proto: p.proto,
        pad: 0,
        pad2: 0,
    };
    // A flow the pod sent on is the pod's own (judged), and a revoked one stays refused.
    // Looked up first, as an LRU insert makes room (evicts) even when the key exists.
    // SAFETY: only presence is checked.
    let known = unsafe {
        FLOWS.get(reply).is_some() || REVOKED.get(reply).is_some() || REPLIES.get(reply).is_some()
    };
    if !known {
        let _ = REPLIES.insert(reply, 1, 0);
    }
    Ok(())
}

fn action(verdict: u32) -> i32 {
    if verdict == flow::REFUSED {
        TC_ACT_SHOT
    } else {
        PASS
    }
}
