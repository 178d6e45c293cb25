//! Small address helpers shared by the compiler, the datapath and the logs.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;

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
}
