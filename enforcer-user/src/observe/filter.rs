//! Which records a reader of `enforcer events` (or `audit-report`) wants.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::records::DenyRecord;

/// Every field set must match; an empty filter takes every record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// A pod's name, or a prefix ending in `*` (`web-*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// `denied`, `audit` or `revoked`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// An address or a CIDR the destination is in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// A host name, or an Istio wildcard (`*.example.com`), that the record's host matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

impl Filter {
    pub fn matches(&self, r: &DenyRecord) -> bool {
        let pod = |want: &str| {
            r.pod
                .as_deref()
                .is_some_and(|p| match want.strip_suffix('*') {
                    Some(prefix) => p.starts_with(prefix),
                    None => p == want,
                })
        };
        let destination = |net: &IpNet| {
            r.dst
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| canonical_net(*net).contains(&crate::policy::canonical_ip(ip)))
        };
        let host = |want: &str| {
            r.host.as_deref().is_some_and(|h| {
                crate::dns::host::covers(
                    &crate::dns::host::normalize(want),
                    &crate::dns::host::normalize(h),
                )
            })
        };
        self.namespace.as_ref().is_none_or(|ns| *ns == r.namespace)
            && self.pod.as_deref().is_none_or(pod)
            && self.verdict.as_ref().is_none_or(|v| v == r.verdict)
            && self.destination.as_ref().is_none_or(destination)
            && self.port.is_none_or(|p| p == r.port)
            && self.host.as_deref().is_none_or(host)
    }
}

/// `::ffff:a.b.c.d/N` as the IPv4 network it is (records write IPv4 plainly).
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> DenyRecord {
        DenyRecord {
            namespace: "shop".into(),
            pod: Some("web-7d9f".into()),
            verdict: "denied",
            dst: "203.0.113.10".into(),
            port: 443,
            host: Some("api.example.com".into()),
            ..DenyRecord::default()
        }
    }

    #[test]
    fn every_field_set_must_match() {
        let r = record();
        let yes = |f: Filter| assert!(f.matches(&r), "{f:?}");
        let no = |f: Filter| assert!(!f.matches(&r), "{f:?}");
        yes(Filter::default());
        yes(Filter {
            namespace: Some("shop".into()),
            pod: Some("web-*".into()),
            verdict: Some("denied".into()),
            destination: Some("203.0.113.0/24".parse().unwrap()),
            port: Some(443),
            host: Some("*.example.com".into()),
        });
        yes(Filter {
            destination: Some("::ffff:203.0.113.0/120".parse().unwrap()),
            ..Filter::default()
        });
        yes(Filter {
            destination: Some("203.0.113.10/32".parse().unwrap()),
            host: Some("API.example.com.".into()),
            ..Filter::default()
        });
        no(Filter {
            namespace: Some("bank".into()),
            ..Filter::default()
        });
        no(Filter {
            pod: Some("web".into()),
            ..Filter::default()
        });
        no(Filter {
            verdict: Some("audit".into()),
            ..Filter::default()
        });
        no(Filter {
            destination: Some("198.51.100.0/24".parse().unwrap()),
            ..Filter::default()
        });
        no(Filter {
            port: Some(80),
            ..Filter::default()
        });
        no(Filter {
            host: Some("*.example.org".into()),
            ..Filter::default()
        });
    }

    #[test]
    fn a_record_without_pod_or_host_fails_filters_on_them() {
        let r = DenyRecord {
            pod: None,
            host: None,
            ..record()
        };
        assert!(!Filter {
            pod: Some("*".into()),
            ..Filter::default()
        }
        .matches(&r));
        assert!(!Filter {
            host: Some("*".into()),
            ..Filter::default()
        }
        .matches(&r));
    }
}
