//! Small address helpers shared by the compiler, the datapath and the logs.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
    str::FromStr,
};

use ipnet::{IpNet, Ipv6Net};

/// Formats `ip:port`, bracketing IPv6 as URLs do.
pub struct SocketFmt(pub IpAddr, pub u16);

impl fmt::Display for SocketFmt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}:{}", self.1),
            IpAddr::V6(v6) => write!(f, "[{v6}]:{}", self.1),
        }
    }
}

/// Parses `1.2.3.4`, `1.2.3.0/24`, `2001:db8::1` or `2001:db8::/32`.
pub fn parse_ip_or_cidr(s: &str) -> Option<IpNet> {
    if s.contains('/') {
        IpNet::from_str(s).ok()
    } else {
        IpAddr::from_str(s).ok().map(IpNet::from)
    }
}

/// The 16-byte key form: IPv4 becomes IPv4-mapped IPv6.
pub fn key_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => enforcer_common::ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Prefix length of `net` in the 16-byte key form.
pub fn key_prefix_len(net: &IpNet) -> u8 {
    match net {
        IpNet::V4(v4) => 96 + v4.prefix_len(),
        IpNet::V6(v6) => v6.prefix_len(),
    }
}

/// `::ffff:0:0`, the network of IPv4-mapped addresses: where the key form keeps IPv4.
const V4_MAPPED: u128 = 0xffff_0000_0000;

/// The prefixes the maps must hold for `net`: `net` itself, except an IPv6 prefix shorter
/// than /96 that covers `::ffff:0:0/96`, which becomes the (at most 96 - len) prefixes that
/// cover the same IPv6 space without it. The key form keeps IPv4 as IPv4-mapped, so `::/1` as
/// one trie entry would also match all of IPv4; Istio never matches IPv4 with an IPv6 CIDR.
/// Expects a canonical net (`policy::Rule` and `Desired::global` hold canonical ones), where
/// a prefix within `::ffff:0:0/96` is already IPv4.
pub fn key_nets(net: IpNet) -> Vec<IpNet> {
    let IpNet::V6(v6) = net else {
        return vec![net];
    };
    let len = v6.prefix_len();
    let covers_mapped = len < 96 && {
        // The bits `net` fixes; a /0 fixes none (a shift by 128 is out of range).
        let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
        u128::from(v6.network()) & mask == V4_MAPPED & mask
    };
    if !covers_mapped {
        return vec![net];
    }
    // Walking from `net` down to `::ffff:0:0/96`, each step leaves the sibling half behind:
    // exactly the space to keep.
    (len + 1..=96)
        .filter_map(|sub| {
            let mask = u128::MAX << (128 - u32::from(sub));
            let sibling = (V4_MAPPED & mask) ^ (1u128 << (128 - u32::from(sub)));
            Ipv6Net::new(Ipv6Addr::from(sibling), sub)
                .ok()
                .map(IpNet::V6)
        })
        .collect()
}

/// Back from the 16-byte key form; IPv4-mapped becomes IPv4.
pub fn from_key_bytes(bytes: [u8; 16]) -> IpAddr {
    crate::policy::canonical_ip(IpAddr::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trip_and_prefix() {
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(from_key_bytes(key_bytes(v4)), v4);
        assert_eq!(
            key_prefix_len(&parse_ip_or_cidr("192.0.2.0/24").unwrap()),
            120
        );
        assert_eq!(
            key_prefix_len(&parse_ip_or_cidr("2001:db8::/32").unwrap()),
            32
        );
        assert!(parse_ip_or_cidr("db.example.com").is_none());
        assert_eq!(
            SocketFmt("2001:db8::1".parse().unwrap(), 443).to_string(),
            "[2001:db8::1]:443"
        );
    }

    fn v6(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    /// Addresses around `net` and around `::ffff:0:0/96`: both ends of each, each mapped
    /// address with one bit flipped (one in every prefix the split makes), and pseudo-random
    /// ones inside `net`.
    fn samples(net: Ipv6Net) -> Vec<u128> {
        let mapped = [V4_MAPPED, V4_MAPPED | 0xc633_6407, V4_MAPPED | 0xffff_ffff];
        let mut out: Vec<u128> = mapped.to_vec();
        for m in mapped {
            out.extend((0..128).map(|bit| m ^ (1u128 << bit)));
        }
        let (lo, hi) = (u128::from(net.network()), u128::from(net.broadcast()));
        out.extend([lo, hi, lo.wrapping_sub(1), hi.wrapping_add(1)]);
        out.extend([V4_MAPPED - 1, V4_MAPPED + (1 << 32), 1, 0x2001_0db8 << 96]);
        let mut x = 0x9e37_79b9_7f4a_7c15_u128 ^ lo;
        for _ in 0..2000 {
            // xorshift: enough spread for sampling, and the same every run.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.push(lo | (x & (hi - lo)));
            out.push(x);
        }
        out
    }

    #[test]
    fn ipv6_prefixes_that_cover_ipv4_mapped_are_split_around_it() {
        let mapped = v6("::ffff:0:0/96");
        for (cidr, parts) in [
            ("::/0", 96),
            ("::/1", 95),
            ("::/64", 32),
            ("::ffff:0:0/95", 1),
            ("2001:db8::/32", 1),
            ("8000::/1", 1),
            ("::1/128", 1),
        ] {
            let net = v6(cidr);
            let got = key_nets(IpNet::V6(net));
            assert_eq!(got.len(), parts, "{cidr}: {got:?}");
            let got: Vec<Ipv6Net> = got
                .into_iter()
                .map(|n| match n {
                    IpNet::V6(n) => n,
                    IpNet::V4(n) => panic!("{cidr} gave IPv4 {n}"),
                })
                .collect();
            for part in &got {
                assert!(
                    !part.contains(&mapped) && !mapped.contains(part),
                    "{cidr}: {part} overlaps {mapped}"
                );
                assert!(net.contains(part), "{cidr}: {part} is outside");
            }
            for addr in samples(net) {
                let ip = Ipv6Addr::from(addr);
                let want = net.contains(&ip) && !mapped.contains(&ip);
                let hits = got.iter().filter(|p| p.contains(&ip)).count();
                assert_eq!(hits, usize::from(want), "{cidr}: {ip}");
            }
        }
    }

    #[test]
    fn what_is_not_an_ipv6_prefix_over_ipv4_mapped_stays_whole() {
        for cidr in [
            "0.0.0.0/0",
            "198.51.100.0/24",
            "2001:db8::/32",
            "::ffff:0:0/96",
        ] {
            let net = parse_ip_or_cidr(cidr).unwrap();
            assert_eq!(key_nets(net), [net], "{cidr}");
        }
    }
}
