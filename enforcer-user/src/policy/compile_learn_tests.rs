//! Which hosts learn addresses from workloads' DNS answers, per scope (issue 14).

use super::*;

/// The learn rules of a scope, as `host-covered?` checks and port lists.
fn learns(d: &Desired, scope: &str, name: &str) -> Vec<(L4, u16)> {
    d.scopes[scope]
        .learn
        .iter()
        .filter(|r| r.hosts.covers(name))
        .flat_map(|r| r.ports.clone())
        .collect()
}

#[test]
fn wildcard_and_dns_entries_learn_static_and_addressed_ones_do_not() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wiki, namespace: default}
spec:
  hosts: ["*.wikipedia.org"]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pypi, namespace: default}
spec:
  hosts: [pypi.org]
  ports: [{number: 443, name: tls, protocol: TLS, targetPort: 8443}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: fixed, namespace: default}
spec:
  hosts: [fixed.example.com]
  addresses: [198.51.100.9]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pinned, namespace: default}
spec:
  hosts: [pinned.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 198.51.100.10}]
"#;
    let d = Case::new(yaml).compile();
    assert_eq!(learns(&d, "default", "en.wikipedia.org"), [(L4::Tcp, 443)]);
    assert!(learns(&d, "default", "wikipedia.org").is_empty());
    assert_eq!(
        learns(&d, "default", "PyPI.org."),
        [(L4::Tcp, 443), (L4::Tcp, 8443)]
    );
    assert!(learns(&d, "default", "fixed.example.com").is_empty());
    assert!(learns(&d, "default", "pinned.example.com").is_empty());
}

#[test]
fn learning_follows_export_to_and_sidecar_imports() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wiki, namespace: a}
spec:
  hosts: ["*.wikipedia.org"]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
  exportTo: ["."]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cdn, namespace: b}
spec:
  hosts: [cdn.example.com, other.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: narrow, namespace: b}
spec:
  egress:
  - hosts: ["./cdn.example.com"]
"#;
    let d = Case::new(yaml).ns(&["a", "b"]).compile();
    assert_eq!(learns(&d, "a", "en.wikipedia.org"), [(L4::Tcp, 443)]);
    assert!(
        learns(&d, "b", "en.wikipedia.org").is_empty(),
        "b must not learn a's entry"
    );
    assert_eq!(learns(&d, "b", "cdn.example.com"), [(L4::Tcp, 443)]);
    assert!(
        learns(&d, "b", "other.example.com").is_empty(),
        "the Sidecar does not import it"
    );
}

#[test]
fn istio_compat_opaque_ports_need_no_learning() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wiki, namespace: default}
spec:
  hosts: ["*.wikipedia.org"]
  ports: [{number: 443, name: tls, protocol: TLS}, {number: 9000, name: raw, protocol: TCP}]
  resolution: NONE
"#;
    let mut case = Case::new(yaml);
    case.compat = true;
    let d = case.compile();
    // TCP under --istio-compat allows every address already; TLS still learns.
    assert_eq!(learns(&d, "default", "en.wikipedia.org"), [(L4::Tcp, 443)]);
}
