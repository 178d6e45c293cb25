use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use super::*;
use crate::{
    istio::OutboundMode,
    policy::{check, compile, decide::decide, Inputs, MeshSettings, L4},
    sources::documents::parse_documents,
};

fn audit(ns: &str, pod: &str, dst: &str, port: u16, host: Option<&str>) -> DenyRecord {
    DenyRecord {
        time_unix_ms: 1_000,
        verdict: "audit",
        namespace: ns.into(),
        pod: Some(pod.into()),
        dst: dst.into(),
        port,
        proto: "tcp".into(),
        host: host.map(Into::into),
        reason_code: "no_rule",
        ..DenyRecord::default()
    }
}

/// Whether `yaml`, compiled alone under REGISTRY_ONLY with `dns` as the answers, lets `ns`
/// reach `ip:port` over TCP; its validation problems fail the test.
fn allows(yaml: &str, dns: &[(&str, &str)], ns: &str, ip: &str, port: u16) -> bool {
    allows_l4(yaml, dns, ns, ip, port, L4::Tcp)
}

fn allows_l4(yaml: &str, dns: &[(&str, &str)], ns: &str, ip: &str, port: u16, l4: L4) -> bool {
    let checked = check::check(parse_documents("suggested.yaml", yaml));
    assert!(
        checked.problems.is_empty(),
        "{yaml}\n{:?}",
        checked.problems
    );
    let dns: BTreeMap<String, Vec<IpAddr>> = dns
        .iter()
        .map(|(name, ip)| (name.to_string(), vec![ip.parse().unwrap()]))
        .collect();
    let desired = compile(&Inputs {
        service_entries: &checked.service_entries,
        mesh: &MeshSettings {
            mode: OutboundMode::RegistryOnly,
            ..MeshSettings::default()
        },
        namespaces: &BTreeSet::from(["shop".to_string(), "bank".to_string()]),
        dns: &dns,
        dns_servers: &[],
        allow_cidrs: &[],
        istio_compat: false,
        sidecars: &checked.sidecars,
        workload_entries: &checked.workload_entries,
        root_namespace: "istio-system",
        only_namespaces: None,
        routing: Default::default(),
    });
    decide(&desired, ns, ip.parse().unwrap(), port, l4).allowed
}

#[test]
fn groups_by_namespace_and_host_or_address() {
    let mut book = AuditBook::default();
    let api = Some("api.example.com");
    book.add(&audit("shop", "web-1", "203.0.113.10", 443, api));
    book.add(&audit("shop", "web-2", "203.0.113.11", 443, api));
    book.add(&audit("shop", "web-1", "198.51.100.7", 5432, None));
    book.add(&audit("bank", "ledger-0", "203.0.113.10", 443, api));
    // Not what REGISTRY_ONLY refuses by destination: not counted.
    book.add(&DenyRecord {
        verdict: "denied",
        ..audit("shop", "web-1", "203.0.113.10", 443, api)
    });
    book.add(&DenyRecord {
        reason_code: "socket_type",
        ..audit("shop", "web-1", "203.0.113.10", 443, api)
    });

    let shop = book.rows(Some("shop"));
    assert_eq!(shop.len(), 2, "{shop:#?}");
    let (dest, seen) = shop[0];
    assert_eq!(dest.host.as_deref(), Some("api.example.com"));
    assert_eq!(seen.count, 2);
    assert_eq!(
        seen.addresses,
        BTreeSet::from(["203.0.113.10".into(), "203.0.113.11".into()])
    );
    assert_eq!(seen.pods, BTreeSet::from(["web-1".into(), "web-2".into()]));
    assert_eq!(shop[1].0.address.as_deref(), Some("198.51.100.7"));
    assert_eq!(book.rows(None).len(), 3);
}

#[test]
fn the_suggested_service_entry_allows_the_addresses_seen_to_its_namespace_only() {
    let dest = Destination {
        namespace: "shop".into(),
        host: Some("api.example.com".into()),
        address: None,
        port: 443,
        proto: "tcp".into(),
    };
    let seen = Seen {
        addresses: BTreeSet::from(["203.0.113.10".into()]),
        ..Seen::default()
    };
    let yaml = dest.service_entry(&seen).unwrap();
    assert!(yaml.contains("api.example.com"), "{yaml}");
    // The name now also resolves elsewhere: only what was seen is allowed.
    let dns = [("api.example.com", "203.0.113.99")];
    assert!(allows(&yaml, &dns, "shop", "203.0.113.10", 443), "{yaml}");
    assert!(!allows(&yaml, &dns, "shop", "203.0.113.99", 443), "{yaml}");
    assert!(!allows(&yaml, &dns, "shop", "203.0.113.10", 80), "{yaml}");
    assert!(!allows(&yaml, &dns, "bank", "203.0.113.10", 443), "{yaml}");
}

#[test]
fn the_suggested_service_entry_for_an_address_allows_that_address_only() {
    for addr in ["198.51.100.7", "2001:db8::7"] {
        let dest = Destination {
            namespace: "shop".into(),
            host: None,
            address: Some(addr.into()),
            port: 5432,
            proto: "udp".into(),
        };
        let yaml = dest.service_entry(&Seen::default()).unwrap();
        let udp = |ns: &str, ip: &str| allows_l4(&yaml, &[], ns, ip, 5432, L4::Udp);
        assert!(udp("shop", addr), "{yaml}");
        assert!(!udp("shop", "198.51.100.8"), "{yaml}");
        assert!(!udp("bank", addr), "{yaml}");
        assert!(
            !allows(&yaml, &[], "shop", addr, 5432),
            "TCP is not UDP: {yaml}"
        );
    }
}

#[test]
fn a_host_that_is_not_a_plain_name_is_not_written_into_the_entry() {
    // A name from a record saved elsewhere (`--from`), or a wildcard: the entry names the
    // address instead, and stays one valid object.
    for host in ["*.example.com", "evil.com\n  exportTo: ['*']", "a b", ""] {
        let dest = Destination {
            namespace: "shop".into(),
            host: Some(host.into()),
            address: None,
            port: 443,
            proto: "tcp".into(),
        };
        let seen = Seen {
            addresses: BTreeSet::from(["203.0.113.10".into()]),
            ..Seen::default()
        };
        let yaml = dest.service_entry(&seen).unwrap();
        assert!(
            !yaml.contains("exportTo: ['*']") && !yaml.contains("*.example"),
            "{yaml}"
        );
        assert!(allows(&yaml, &[], "shop", "203.0.113.10", 443), "{yaml}");
        assert!(!allows(&yaml, &[], "bank", "203.0.113.10", 443), "{yaml}");
    }
}

#[test]
fn one_namespace_cannot_fill_the_book() {
    let mut book = AuditBook::default();
    for port in 1..=u16::try_from(GROUPS_PER_NAMESPACE + 5).unwrap() {
        book.add(&audit("noisy", "p", "203.0.113.1", port, None));
    }
    book.add(&audit("quiet", "q", "203.0.113.2", 443, None));
    assert_eq!(book.rows(Some("noisy")).len(), GROUPS_PER_NAMESPACE);
    assert_eq!(book.rows(Some("quiet")).len(), 1);
    assert_eq!(book.overflow, 5);
    // Through the wire and back, the count per namespace holds.
    let mut again = book.clone().report().book();
    again.add(&audit("noisy", "p", "203.0.113.1", 60_000, None));
    assert_eq!(again.rows(Some("noisy")).len(), GROUPS_PER_NAMESPACE);
}

#[test]
fn the_book_is_bounded() {
    let mut book = AuditBook::default();
    for i in 0..(GROUPS as u32 + 5) {
        let port = u16::try_from(i % 1000 + 1).unwrap();
        let ns = format!("ns-{}", i / 1000);
        book.add(&audit(&ns, "p", "203.0.113.1", port, None));
    }
    assert_eq!(book.groups.len(), GROUPS);
    assert_eq!(book.overflow, 5);
}
