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
    hook, ipv4_mapped, mode, proto, tc_flags, verdict, CgroupScope, FlowKey, FlowVerdict,
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

struct Packet {
    src: [u8; 16],
    dst: [u8; 16],
    proto: u8,
    sport: u16,
    dport: u16,
    /// ICMPv6 neighbour discovery, which IPv6 needs to work at all.
    ndp: bool,
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
        if c.generation == config.generation {
            return Ok(action(c.allowed != 0, &scope));
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
            allowed: u32::from(ok),
        },
        0,
    );
    if !ok {
        let was_allowed = cached.is_some_and(|c| c.allowed != 0);
        let why = if was_allowed && scope.mode != mode::AUDIT {
            verdict::REVOKED
        } else {
            refusal(&scope)
        };
        report(&scope, 0, 0, [0; 16], &key, hook::TC, why);
    }
    Ok(action(ok, &scope))
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
    }))
}
