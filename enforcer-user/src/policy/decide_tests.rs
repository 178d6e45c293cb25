use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::{
    policy::{check, compile, Inputs, MeshSettings},
    sources::documents::parse_documents,
};

const POLICY: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: postgres-db, namespace: frontend}
spec:
  hosts: [db.example.com]
  ports: [{number: 5432, name: pg, protocol: TCP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}, {number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: web, namespace: shop}
spec:
  workloadSelector: {labels: {app: web}}
  egress: [{port: {number: 443, protocol: TLS, name: tls}, hosts: ["./*"]}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: legacy}
spec: {outboundTrafficPolicy: {mode: ALLOW_ANY}}
"#;

fn desired(mode: OutboundMode) -> Desired {
    let checked = check::check(parse_documents("t.yaml", POLICY));
    assert!(checked.problems.is_empty(), "{:?}", checked.problems);
    let dns = BTreeMap::from([
        (
            "db.example.com".to_string(),
            vec!["198.51.100.20".parse().unwrap()],
        ),
        (
            "api.example.com".to_string(),
            vec!["203.0.113.30".parse().unwrap()],
        ),
    ]);
    compile(&Inputs {
        service_entries: &checked.service_entries,
        mesh: &MeshSettings {
            mode,
            ..MeshSettings::default()
        },
        namespaces: &BTreeSet::from(["default".to_string()]),
        dns: &dns,
        dns_servers: &["127.0.0.153:53".parse().unwrap()],
        allow_cidrs: &[],
        istio_compat: false,
        sidecars: &checked.sidecars,
        workload_entries: &checked.workload_entries,
        root_namespace: "istio-system",
        only_namespaces: None,
        routing: Default::default(),
    })
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn allowed_names_the_service_entry_and_host() {
    let d = desired(OutboundMode::RegistryOnly);
    let dec = decide(&d, "frontend", ip("198.51.100.20"), 5432, L4::Tcp);
    assert!(dec.allowed);
    let text = dec.describe();
    assert!(
        text.starts_with("ALLOWED: by ServiceEntry frontend/postgres-db (host db.example.com)"),
        "{text}"
    );
    // The same address written IPv4-mapped is the same decision.
    let mapped = decide(&d, "frontend", ip("::ffff:198.51.100.20"), 5432, L4::Tcp);
    assert!(mapped.allowed);
    assert!(
        !decide(&d, "frontend", ip("198.51.100.20"), 5432, L4::Udp).allowed,
        "UDP is not TCP"
    );
}

#[test]
fn refused_says_where_the_host_is_exported() {
    let d = desired(OutboundMode::RegistryOnly);
    let dec = decide(&d, "default", ip("198.51.100.20"), 5432, L4::Tcp);
    assert!(!dec.allowed);
    let text = dec.describe();
    assert!(
        text.starts_with(
            "REFUSED: no ServiceEntry visible to namespace default allows 198.51.100.20:5432/tcp"
        ),
        "{text}"
    );
    assert!(text.contains("exported only to [frontend]"), "{text}");
}

#[test]
fn refused_by_a_workload_sidecar_says_so() {
    let d = desired(OutboundMode::RegistryOnly);
    let web = d
        .scope_for("shop", &BTreeMap::from([("app".into(), "web".into())]))
        .unwrap()
        .to_string();
    assert!(decide(&d, &web, ip("203.0.113.30"), 443, L4::Tcp).allowed);
    let dec = decide(&d, &web, ip("203.0.113.30"), 80, L4::Tcp);
    assert!(!dec.allowed);
    let text = dec.describe();
    assert!(text.contains("(Sidecar shop/web in force)"), "{text}");
    assert!(
        text.contains("does not import shop/api.example.com on port 80"),
        "{text}"
    );
    assert!(
        decide(&d, "shop", ip("203.0.113.30"), 80, L4::Tcp).allowed,
        "the rest of the namespace imports everything"
    );
}

#[test]
fn modes_globals_builtins_and_unknown_namespaces() {
    let d = desired(OutboundMode::RegistryOnly);
    let any = decide(&d, "legacy", ip("203.0.113.99"), 25, L4::Tcp);
    assert_eq!((any.allowed, &any.because), (true, &Because::AllowAny));
    let lo = decide(&d, "default", ip("127.0.0.1"), 9, L4::Udp);
    assert!(matches!(lo.because, Because::Global(_)), "{lo:?}");
    let dns = decide(&d, "default", ip("127.0.0.153"), 53, L4::Udp);
    assert!(dns.describe().contains("(built-in: DNS server)"), "{dns:?}");
    let none = decide(&d, "nowhere", ip("203.0.113.99"), 25, L4::Tcp);
    assert_eq!(none.because, Because::Unenforced);

    let audit = desired(OutboundMode::Audit);
    let dec = decide(&audit, "default", ip("203.0.113.99"), 25, L4::Tcp);
    assert!(dec.allowed && dec.audited, "{dec:?}");
}
