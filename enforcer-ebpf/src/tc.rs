//! Per-packet enforcement on the host side of a pod's veth, where ingress is the pod's egress.
//! It catches what connect() never sees (raw sockets, flows opened before a revocation), with
//! the same allow maps. An established flow costs one LRU lookup until the agent bumps the
//! policy generation.
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

/// Not ours to decide: the next program runs (`TCX_NEXT` under TCX; the next filter under
/// legacy cls_bpf in direct-action mode).
const PASS: i32 = TC_ACT_UNSPEC;

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
    let Some(p) = parse(ctx)? else {
        // ARP and everything else that is not IP.
        return Ok(PASS);
    };
    let config = config();
    let icmp = p.proto == proto::ICMP || p.proto == proto::ICMPV6;
    if p.ndp || (icmp && config.flags & tc_flags::JUDGE_ICMP == 0) {
        return Ok(PASS);
    }
    let flow = FlowKey {
        src: p.src,
        dst: p.dst,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        pad: [0; 3],
    };
    // An established flow costs this one lookup.
    // SAFETY: the value is copied out at once.
    let cached = unsafe { FLOWS.get(flow) }.copied();
    if let Some(c) = cached {
        if c.allowed == flow::REPLY || c.generation == config.generation {
            return Ok(action(c.allowed));
        }
    }
    // SAFETY: the value is copied out at once.
    let Some(scope) = (unsafe { POD_SCOPES.get(p.src) }).copied() else {
        // Not from a pod this agent knows.
        return Ok(PASS);
    };
    let key = PolicyKey {
        scope: scope.scope,
        port: p.dport,
        proto: p.proto,
        pad: 0,
        addr: p.dst,
    };
    let ok = scope.mode == mode::ALLOW_ANY || allowed(&key);
    let verdict = match (ok, scope.mode) {
        (true, _) => flow::ALLOWED,
        (false, mode::AUDIT) => flow::AUDITED,
        (false, _) => flow::REFUSED,
    };
    let _ = FLOWS.insert(
        flow,
        FlowVerdict {
            generation: config.generation,
            allowed: verdict,
        },
        0,
    );
    if !ok {
        let was_allowed = cached.is_some_and(|c| c.allowed == flow::ALLOWED);
        let why = if was_allowed && verdict == flow::REFUSED {
            verdict::REVOKED
        } else {
            refusal(&scope)
        };
        report(&scope, 0, 0, [0; 16], &key, hook::TC, why);
    }
    Ok(action(verdict))
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
    let Some(p) = parse(ctx)? else {
        return Ok(());
    };
    let Some(l4) = p.l4 else {
        return Ok(());
    };
    let opens = match p.proto {
        proto::TCP => {
            // Data offset and flags, read as one u16 (see `icmp_type`).
            let flags = (u16::from_be(at::<u16>(ctx, l4 + 12)?) & 0xff) as u8;
            flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        }
        proto::UDP => true,
        proto::ICMP => icmp_type(ctx, l4)? == ICMP_ECHO_REQUEST,
        proto::ICMPV6 => icmp_type(ctx, l4)? == ICMPV6_ECHO_REQUEST,
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

fn action(verdict: u32) -> i32 {
    if verdict == flow::REFUSED {
        TC_ACT_SHOT
    } else {
        PASS
    }
}

/// Ethernet, the longest IPv4 header, and TCP up to its flags.
const HEADERS: u32 = (ETH_HLEN + 60 + 14) as u32;

/// Reads a `T` at `off` of the packet's linear data: direct access, no helper call per field.
#[inline(always)]
fn at<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + off + core::mem::size_of::<T>() > end {
        return Err(());
    }
    // SAFETY: within [data, data_end), checked above; packet data has no alignment.
    Ok(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
}

/// The ICMP type, read with its code as one u16: for a one-byte read at a variable offset, LLVM
/// turns the bounds check into a form the verifier gives no range for.
#[inline(always)]
fn icmp_type(ctx: &TcContext, off: usize) -> Result<u8, ()> {
    Ok((u16::from_be(at::<u16>(ctx, off)?) >> 8) as u8)
}

/// `None` for packets that are not IP. Ports are 0 for other protocols and for IPv4 fragments
/// after the first. A packet too short for the headers it announces is an error (dropped).
fn parse(ctx: &TcContext) -> Result<Option<Packet>, ()> {
    if let Ok(p) = parse_linear(ctx) {
        return Ok(p);
    }
    // Headers outside the linear part: pull them in, only then, as that may copy the packet.
    ctx.pull_data(ctx.len().min(HEADERS)).map_err(|_| ())?;
    parse_linear(ctx)
}

#[inline(always)]
fn parse_linear(ctx: &TcContext) -> Result<Option<Packet>, ()> {
    let ethertype = u16::from_be(at::<u16>(ctx, 12)?);
    let (src, dst, proto, l4) = match ethertype {
        ETH_P_IP => {
            let ver_ihl: u8 = at(ctx, ETH_HLEN)?;
            let ihl = usize::from(ver_ihl & 0x0f) * 4;
            let frag = u16::from_be(at::<u16>(ctx, ETH_HLEN + 6)?);
            let proto: u8 = at(ctx, ETH_HLEN + 9)?;
            let src: [u8; 4] = at(ctx, ETH_HLEN + 12)?;
            let dst: [u8; 4] = at(ctx, ETH_HLEN + 16)?;
            let first = frag & 0x1fff == 0;
            (
                ipv4_mapped(src),
                ipv4_mapped(dst),
                proto,
                first.then_some(ETH_HLEN + ihl),
            )
        }
        ETH_P_IPV6 => {
            let proto: u8 = at(ctx, ETH_HLEN + 6)?;
            let src: [u8; 16] = at(ctx, ETH_HLEN + 8)?;
            let dst: [u8; 16] = at(ctx, ETH_HLEN + 24)?;
            (src, dst, proto, Some(ETH_HLEN + 40))
        }
        _ => return Ok(None),
    };
    let (mut sport, mut dport, mut ndp) = (0, 0, false);
    if let Some(off) = l4 {
        if proto == proto::TCP || proto == proto::UDP {
            sport = u16::from_be(at::<u16>(ctx, off)?);
            dport = u16::from_be(at::<u16>(ctx, off + 2)?);
        } else if proto == proto::ICMPV6 {
            ndp = (133..=137).contains(&icmp_type(ctx, off)?);
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
