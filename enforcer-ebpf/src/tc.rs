//! Per-packet enforcement on the host side of a pod's veth, where ingress is the pod's egress.
//! It catches what connect() never sees (raw sockets, flows opened before a revocation), with
//! the same allow maps. An established flow costs one LRU lookup until the agent bumps the
//! policy generation.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap},
    programs::TcContext,
};
use enforcer_common::{
    flow, hook, ipv4_mapped, mode, proto, tc_flags, verdict, CgroupScope, FlowKey, FlowVerdict,
    PolicyKey, TcConfig,
};

use crate::{allowed, refusal, report};

#[map(name = "ENF_POD_SCOPES")]
static POD_SCOPES: HashMap<[u8; 16], CgroupScope> = HashMap::pinned(65_536, 0);

#[map(name = "ENF_FLOWS")]
static FLOWS: LruHashMap<FlowKey, FlowVerdict> = LruHashMap::pinned(262_144, 0);

#[map(name = "ENF_TC_CONFIG")]
static TC_CONFIG: Array<TcConfig> = Array::pinned(1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
/// `BPF_NOEXIST`: a pod's own flow keeps the verdict it was judged with.
const NOEXIST: u64 = 1;

struct Packet {
    src: [u8; 16],
    dst: [u8; 16],
    proto: u8,
    sport: u16,
    dport: u16,
    /// ICMPv6 neighbour discovery, which IPv6 needs to work at all.
    ndp: bool,
    /// Offset of the transport header; `None` for IPv4 fragments after the first.
    l4: Option<usize>,
}

#[classifier]
pub fn enforcer_tc(ctx: TcContext) -> i32 {
    try_tc(&ctx).unwrap_or(TC_ACT_SHOT)
}

fn try_tc(ctx: &TcContext) -> Result<i32, ()> {
    let Some(p) = parse(ctx)? else {
        // ARP and everything else that is not IP.
        return Ok(TC_ACT_OK);
    };
    // SAFETY: the value is copied out at once.
    let Some(scope) = (unsafe { POD_SCOPES.get(p.src) }).copied() else {
        return Ok(TC_ACT_OK);
    };
    let config = TC_CONFIG.get(0).copied().unwrap_or_default();
    let icmp = p.proto == proto::ICMP || p.proto == proto::ICMPV6;
    if p.ndp || (icmp && config.flags & tc_flags::JUDGE_ICMP == 0) || scope.mode == mode::ALLOW_ANY
    {
        return Ok(TC_ACT_OK);
    }
    let flow = FlowKey {
        src: p.src,
        dst: p.dst,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        pad: [0; 3],
    };
    // SAFETY: the value is copied out at once.
    let cached = unsafe { FLOWS.get(flow) }.copied();
    if let Some(c) = cached {
        if c.allowed == flow::REPLY {
            return Ok(TC_ACT_OK);
        }
        if c.generation == config.generation {
            return Ok(action(c.allowed == flow::ALLOWED, &scope));
        }
    }
    let key = PolicyKey {
        scope: scope.scope,
        port: p.dport,
        proto: p.proto,
        pad: 0,
        addr: p.dst,
    };
    let ok = allowed(&key);
    let _ = FLOWS.insert(
        flow,
        FlowVerdict {
            generation: config.generation,
            allowed: if ok { flow::ALLOWED } else { flow::REFUSED },
        },
        0,
    );
    if !ok {
        let was_allowed = cached.is_some_and(|c| c.allowed == flow::ALLOWED);
        let why = if was_allowed && scope.mode != mode::AUDIT {
            verdict::REVOKED
        } else {
            refusal(&scope)
        };
        report(&scope, 0, 0, [0; 16], &key, hook::TC, why);
    }
    Ok(action(ok, &scope))
}

/// On the host side's egress, which is the way into the pod. A connection that a peer opens to
/// the pod (TCP SYN, a UDP datagram, an echo request) lets the pod's replies pass, which egress
/// policy does not govern. It never drops.
#[classifier]
pub fn enforcer_reply(ctx: TcContext) -> i32 {
    let _ = note_inbound(&ctx);
    TC_ACT_OK
}

fn note_inbound(ctx: &TcContext) -> Result<(), ()> {
    let Some(p) = parse(ctx)? else {
        return Ok(());
    };
    let Some(l4) = p.l4 else {
        return Ok(());
    };
    let opens = match p.proto {
        proto::TCP => ctx.load::<u8>(l4 + 13).map_err(|_| ())? & (TCP_SYN | TCP_ACK) == TCP_SYN,
        proto::UDP => true,
        proto::ICMP => ctx.load::<u8>(l4).map_err(|_| ())? == ICMP_ECHO_REQUEST,
        proto::ICMPV6 => ctx.load::<u8>(l4).map_err(|_| ())? == ICMPV6_ECHO_REQUEST,
        _ => false,
    };
    // SAFETY: only presence is checked.
    if !opens || unsafe { POD_SCOPES.get(p.dst) }.is_none() {
        return Ok(());
    }
    let reply = FlowKey {
        src: p.dst,
        dst: p.src,
        sport: p.dport,
        dport: p.sport,
        proto: p.proto,
        pad: [0; 3],
    };
    let _ = FLOWS.insert(
        reply,
        FlowVerdict {
            generation: 0,
            allowed: flow::REPLY,
        },
        NOEXIST,
    );
    Ok(())
}

fn action(allowed: bool, scope: &CgroupScope) -> i32 {
    if allowed || scope.mode == mode::AUDIT {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

/// `None` for packets that are not IP. Ports are 0 for other protocols and for IPv4 fragments
/// after the first.
fn parse(ctx: &TcContext) -> Result<Option<Packet>, ()> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).map_err(|_| ())?);
    let (src, dst, proto, l4) = match ethertype {
        ETH_P_IP => {
            let ver_ihl: u8 = ctx.load(ETH_HLEN).map_err(|_| ())?;
            let ihl = usize::from(ver_ihl & 0x0f) * 4;
            let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).map_err(|_| ())?);
            let proto: u8 = ctx.load(ETH_HLEN + 9).map_err(|_| ())?;
            let src: [u8; 4] = ctx.load(ETH_HLEN + 12).map_err(|_| ())?;
            let dst: [u8; 4] = ctx.load(ETH_HLEN + 16).map_err(|_| ())?;
            let first = frag & 0x1fff == 0;
            (
                ipv4_mapped(src),
                ipv4_mapped(dst),
                proto,
                first.then_some(ETH_HLEN + ihl),
            )
        }
        ETH_P_IPV6 => {
            let proto: u8 = ctx.load(ETH_HLEN + 6).map_err(|_| ())?;
            let src: [u8; 16] = ctx.load(ETH_HLEN + 8).map_err(|_| ())?;
            let dst: [u8; 16] = ctx.load(ETH_HLEN + 24).map_err(|_| ())?;
            (src, dst, proto, Some(ETH_HLEN + 40))
        }
        _ => return Ok(None),
    };
    let (mut sport, mut dport, mut ndp) = (0, 0, false);
    if let Some(off) = l4 {
        if proto == proto::TCP || proto == proto::UDP {
            sport = u16::from_be(ctx.load::<u16>(off).map_err(|_| ())?);
            dport = u16::from_be(ctx.load::<u16>(off + 2).map_err(|_| ())?);
        } else if proto == proto::ICMPV6 {
            let kind: u8 = ctx.load(off).map_err(|_| ())?;
            ndp = (133..=137).contains(&kind);
        }
    }
    Ok(Some(Packet {
        src,
        dst,
        proto,
        sport,
        dport,
        ndp,
        l4,
    }))
}
