//! Headers as the TC judge (from Ethernet) and the egress check (from IP) read them.

use aya_ebpf::programs::TcContext;
use enforcer_common::{ipv4_mapped, proto};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;

pub const NEXT_HOP_BY_HOP: u8 = 0;
pub const NEXT_ROUTING: u8 = 43;
pub const NEXT_FRAGMENT: u8 = 44;
pub const NEXT_DSTOPTS: u8 = 60;
/// IPv6 extension headers walked before a packet counts as unjudgeable.
const MAX_EXT: usize = 6;

/// Where a packet belongs in its datagram. IPv4 and IPv6 fragments alike.
#[derive(Clone, Copy)]
pub struct Frag {
    pub id: u32,
    /// The first of several fragments: its verdict is kept for the others.
    pub first: bool,
    /// A later fragment: it has no transport header.
    pub later: bool,
}

#[derive(Clone, Copy)]
pub struct Packet {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub hop_limit: u8,
    /// The ICMP or ICMPv6 type, for those protocols in a first (or only) fragment.
    pub icmp_type: u8,
    /// The TCP flags, for TCP in a first (or only) fragment.
    pub tcp_flags: u8,
    /// Whether there is a transport header (at [`Packet::l4`]): not in later fragments.
    pub has_l4: bool,
    pub l4: usize,
    pub frag: Frag,
    /// IPv4 options or an IPv6 routing header: the destination is only the first hop.
    pub routed: bool,
    /// More IPv6 extension headers than are walked.
    pub unwalked: bool,
    /// The interface it came in on (TC), which records name: the agent knows its pod.
    pub ifindex: u32,
}

impl Packet {
    pub const fn empty() -> Self {
        Self {
            src: [0; 16],
            dst: [0; 16],
            proto: 0,
            sport: 0,
            dport: 0,
            hop_limit: 0,
            icmp_type: 0,
            tcp_flags: 0,
            has_l4: false,
            l4: 0,
            frag: Frag {
                id: 0,
                first: false,
                later: false,
            },
            routed: false,
            unwalked: false,
            ifindex: 0,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// IPv4 or IPv6: the packet was filled in.
    Ip,
    Arp,
    /// Another ethertype, VLAN tags among them.
    Other,
}

/// What an IPv6 extension header walk found.
pub struct Ext {
    pub next: u8,
    pub off: usize,
    pub routed: bool,
    /// All false without a fragment header. Not an `Option`: LLVM spills a `None`'s unwritten
    /// payload, which the verifier refuses to read.
    pub frag: Frag,
    pub complete: bool,
}

/// Walks IPv6 extension headers from `next` at `off`; `load8` reads 8 bytes at an offset.
#[inline(always)]
pub fn walk_ipv6(
    mut next: u8,
    mut off: usize,
    load8: impl Fn(usize) -> Result<[u8; 8], ()>,
) -> Result<Ext, ()> {
    let mut routed = false;
    let mut frag = Frag {
        id: 0,
        first: false,
        later: false,
    };
    for _ in 0..MAX_EXT {
        match next {
            NEXT_HOP_BY_HOP | NEXT_DSTOPTS | NEXT_ROUTING => {
                let h = load8(off)?;
                routed |= next == NEXT_ROUTING;
                next = h[0];
                off += (usize::from(h[1]) + 1) * 8;
            }
            NEXT_FRAGMENT => {
                let h = load8(off)?;
                let offset = u16::from_be_bytes([h[2], h[3]]) >> 3;
                let more = h[3] & 1 == 1;
                frag = Frag {
                    id: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
                    first: offset == 0 && more,
                    later: offset != 0,
                };
                next = h[0];
                off += 8;
            }
            _ => break,
        }
    }
    let complete = !matches!(
        next,
        NEXT_HOP_BY_HOP | NEXT_DSTOPTS | NEXT_ROUTING | NEXT_FRAGMENT
    );
    Ok(Ext {
        next,
        off,
        routed,
        frag,
        complete,
    })
}

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

/// An IPv6 address at `at`, a packet address the caller checked: four loads, as a 16-byte copy
/// becomes a call to `memcpy`, which the verifier refuses on packet memory.
///
/// # Safety
/// `at..at + 16` lies within the packet's linear data.
#[inline(always)]
unsafe fn addr16(at: usize) -> [u8; 16] {
    let word = |i: usize| {
        // SAFETY: within the range the caller checked.
        unsafe { core::ptr::read_unaligned((at + i * 4) as *const u32) }.to_ne_bytes()
    };
    let mut a = [0u8; 16];
    a[0..4].copy_from_slice(&word(0));
    a[4..8].copy_from_slice(&word(1));
    a[8..12].copy_from_slice(&word(2));
    a[12..16].copy_from_slice(&word(3));
    a
}

/// Ethernet, the longest IPv4 header, and TCP up to its flags.
const HEADERS: u32 = (ETH_HLEN + 60 + 14) as u32;

/// Fills `p` for IP packets. A packet too short for the headers it announces is an error
/// (dropped).
///
/// Inlined, and writing through `p`: a BPF function of its own costs the judge about 60 ns a
/// packet here, and returning the packet would go through a stack pointer, which the
/// verifier refuses.
#[inline(always)]
pub fn parse(ctx: &TcContext, p: &mut Packet) -> Result<Frame, ()> {
    if let Ok(frame) = parse_linear(ctx, p) {
        return Ok(frame);
    }
    // Headers outside the linear part: pull them in, only then, as that may copy the packet.
    ctx.pull_data(ctx.len().min(HEADERS)).map_err(|_| ())?;
    parse_linear(ctx, p)
}

#[inline(always)]
fn parse_linear(ctx: &TcContext, p: &mut Packet) -> Result<Frame, ()> {
    match u16::from_be(at::<u16>(ctx, 12)?) {
        ETH_P_IP => ipv4(ctx, p).map(|()| Frame::Ip),
        ETH_P_IPV6 => ipv6(ctx, p).map(|()| Frame::Ip),
        ETH_P_ARP => Ok(Frame::Arp),
        _ => Ok(Frame::Other),
    }
}

#[inline(always)]
fn ipv4(ctx: &TcContext, p: &mut Packet) -> Result<(), ()> {
    let ver_ihl: u8 = at(ctx, ETH_HLEN)?;
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    let id = u16::from_be(at::<u16>(ctx, ETH_HLEN + 4)?);
    let frag = u16::from_be(at::<u16>(ctx, ETH_HLEN + 6)?);
    let ttl_proto = u16::from_be(at::<u16>(ctx, ETH_HLEN + 8)?);
    let (offset, more) = (frag & 0x1fff, frag & 0x2000 != 0);
    p.src = ipv4_mapped(at(ctx, ETH_HLEN + 12)?);
    p.dst = ipv4_mapped(at(ctx, ETH_HLEN + 16)?);
    p.proto = ttl_proto as u8;
    p.hop_limit = (ttl_proto >> 8) as u8;
    p.frag = Frag {
        id: u32::from(id),
        first: offset == 0 && more,
        later: offset != 0,
    };
    p.routed = ihl > 20;
    p.unwalked = false;
    p.has_l4 = offset == 0;
    (p.sport, p.dport, p.icmp_type, p.tcp_flags) = (0, 0, 0, 0);
    if offset == 0 {
        let off = ETH_HLEN + ihl;
        p.l4 = off;
        if has_ports(p.proto) {
            p.sport = u16::from_be(at::<u16>(ctx, off)?);
            p.dport = u16::from_be(at::<u16>(ctx, off + 2)?);
            if p.proto == proto::TCP {
                // Data offset and flags, read as one u16 (see the ICMP type below).
                p.tcp_flags = (u16::from_be(at::<u16>(ctx, off + 12)?) & 0xff) as u8;
            }
        } else if p.proto == proto::ICMP {
            // Type and code read as one u16: for a one-byte read at a variable offset, LLVM
            // turns the bounds check into a form the verifier gives no range for.
            p.icmp_type = (u16::from_be(at::<u16>(ctx, off)?) >> 8) as u8;
        }
    }
    Ok(())
}

#[inline(always)]
fn ipv6(ctx: &TcContext, p: &mut Packet) -> Result<(), ()> {
    // One bounds check for the fixed header: a check per field lets LLVM merge them into
    // masks on packet pointers, which the verifier refuses.
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH_HLEN + 40 > end {
        return Err(());
    }
    let head = start + ETH_HLEN;
    // SAFETY: the fixed header lies within [data, data_end), checked above.
    let next_hop = u16::from_be(unsafe { core::ptr::read_unaligned((head + 6) as *const u16) });
    // SAFETY: as above.
    (p.src, p.dst) = unsafe { (addr16(head + 8), addr16(head + 24)) };
    let load8 = |off: usize| ctx.load::<[u8; 8]>(off).map_err(|_| ());
    let ext = walk_ipv6((next_hop >> 8) as u8, ETH_HLEN + 40, load8)?;
    p.frag = ext.frag;
    p.proto = ext.next;
    p.hop_limit = next_hop as u8;
    p.routed = ext.routed;
    p.unwalked = !ext.complete;
    p.has_l4 = ext.complete && !p.frag.later;
    p.l4 = ext.off;
    (p.sport, p.dport, p.icmp_type, p.tcp_flags) = (0, 0, 0, 0);
    if p.has_l4 {
        if has_ports(p.proto) {
            let ports = ctx.load::<[u8; 4]>(ext.off).map_err(|_| ())?;
            p.sport = u16::from_be_bytes([ports[0], ports[1]]);
            p.dport = u16::from_be_bytes([ports[2], ports[3]]);
            if p.proto == proto::TCP {
                p.tcp_flags = ctx.load::<u8>(ext.off + 13).map_err(|_| ())?;
            }
        } else if p.proto == proto::ICMPV6 {
            p.icmp_type = ctx.load::<u8>(ext.off).map_err(|_| ())?;
        }
    }
    Ok(())
}

/// Protocols whose first four bytes are the source and destination ports.
#[inline(always)]
fn has_ports(protocol: u8) -> bool {
    matches!(
        protocol,
        proto::TCP | proto::UDP | proto::UDPLITE | proto::SCTP
    )
}
