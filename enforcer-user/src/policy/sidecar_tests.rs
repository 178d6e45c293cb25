use super::*;
use crate::sources::documents::parse_documents;

fn load(yaml: &str) -> Vec<Sidecar> {
    let snap = parse_documents("t.yaml", yaml);
    assert!(snap.problems.is_empty(), "{:?}", snap.problems);
    snap.sidecars
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const OBJECTS: &str = r#"
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: istio-system}
spec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: legacy}
spec: {outboundTrafficPolicy: {mode: ALLOW_ANY}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: shop}
spec: {egress: [{hosts: ["./*", "platform/*.payments.example.com"]}]}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: newer, namespace: open, creationTimestamp: "2026-02-01T00:00:00Z"}
spec: {workloadSelector: {labels: {app: db}}, outboundTrafficPolicy: {mode: ALLOW_ANY}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: older, namespace: open, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {workloadSelector: {labels: {app: db, tier: data}}, egress: [{hosts: ["./*"]}]}
"#;

fn default_mode(sidecars: &[Sidecar], ns: &str, root: &str) -> OutboundMode {
    scopes_for_namespace(ns, sidecars, root, OutboundMode::AllowAny).0[0].mode
}

#[test]
fn precedence_namespace_then_root_then_mesh() {
    let sidecars = load(OBJECTS);
    assert_eq!(
        default_mode(&sidecars, "legacy", "istio-system"),
        OutboundMode::AllowAny,
        "the namespace's own Sidecar wins"
    );
    assert_eq!(
        default_mode(&sidecars, "frontend", "istio-system"),
        OutboundMode::RegistryOnly,
        "then the root namespace's"
    );
    assert_eq!(
        default_mode(&sidecars, "frontend", "elsewhere"),
        OutboundMode::AllowAny,
        "then the mesh"
    );
    // shop's Sidecar sets no mode: the mesh decides, not the root namespace's Sidecar.
    assert_eq!(
        default_mode(&sidecars, "shop", "istio-system"),
        OutboundMode::AllowAny
    );
}

#[test]
fn selecting_sidecars_become_workload_scopes_oldest_first() {
    let sidecars = load(OBJECTS);
    let (scopes, notes) = scopes_for_namespace(
        "open",
        &sidecars,
        "istio-system",
        OutboundMode::RegistryOnly,
    );
    assert!(notes.is_empty());
    let ids: Vec<Option<&str>> = scopes.iter().map(|s| s.sidecar.as_deref()).collect();
    assert_eq!(
        ids,
        [
            Some("istio-system/default"),
            Some("open/older"),
            Some("open/newer")
        ]
    );
    assert_eq!(scopes[2].mode, OutboundMode::AllowAny);
    assert_eq!(
        scopes[1].mode,
        OutboundMode::RegistryOnly,
        "no policy of its own: the mesh's"
    );
    let both = labels(&[("app", "db"), ("tier", "data")]);
    let first = scopes[1..]
        .iter()
        .find(|s| selects(s.selector.as_ref().unwrap(), &both));
    assert_eq!(first.unwrap().sidecar.as_deref(), Some("open/older"));
    assert!(!selects(
        scopes[1].selector.as_ref().unwrap(),
        &labels(&[("app", "db")])
    ));
}

#[test]
fn two_unselected_sidecars_are_noted_and_the_oldest_wins() {
    let sidecars = load(
        r#"
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: b, namespace: x, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: a, namespace: x, creationTimestamp: "2026-03-01T00:00:00Z"}
spec: {outboundTrafficPolicy: {mode: ALLOW_ANY}}
"#,
    );
    let (scopes, notes) = scopes_for_namespace("x", &sidecars, "r", OutboundMode::AllowAny);
    assert_eq!(scopes[0].sidecar.as_deref(), Some("x/b"));
    assert_eq!(scopes[0].mode, OutboundMode::RegistryOnly);
    assert!(notes[0].contains("more than one"), "{notes:?}");
}

#[test]
fn egress_hosts_narrow_imports() {
    let sidecars = load(OBJECTS);
    let (scopes, _) = scopes_for_namespace(
        "shop",
        &sidecars,
        "istio-system",
        OutboundMode::RegistryOnly,
    );
    let shop = &scopes[0];
    assert!(shop.imports("platform", "api.payments.example.com", 443));
    assert!(!shop.imports("platform", "smtp.example.com", 25));
    assert!(shop.imports("shop", "anything.example.com", 80), "./*");
    let (frontend, _) = scopes_for_namespace(
        "frontend",
        &sidecars,
        "istio-system",
        OutboundMode::RegistryOnly,
    );
    assert!(
        frontend[0].imports("platform", "smtp.example.com", 25),
        "no egress section: everything visible"
    );
}

#[test]
fn listener_ports_and_namespace_specific_imports() {
    let sidecars = load(
        r#"
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: app}
spec:
  egress:
  - port: {number: 443, protocol: TLS, name: tls}
    hosts: ["*/*"]
  - port: {number: 3128, protocol: HTTP_PROXY, name: proxy}
    hosts: ["*/proxy.example.com"]
  - hosts: ["platform/db.example.com", "*/*.example.org", "~/*"]
"#,
    );
    let (scopes, _) = scopes_for_namespace("app", &sidecars, "r", OutboundMode::RegistryOnly);
    let s = &scopes[0];
    assert!(
        s.imports("anywhere", "api.example.com", 443),
        "443 listener"
    );
    assert!(!s.imports("anywhere", "api.example.com", 80), "not on 80");
    assert!(s.imports("platform", "db.example.com", 5432), "catch-all");
    assert!(s.imports("other", "www.example.org", 80), "*/ in catch-all");
    assert!(
        !s.imports("platform", "www.example.org", 80),
        "platform/ hides */ for platform's entries, as in Istio"
    );
    assert!(
        s.imports("x", "proxy.example.com", 8080),
        "HTTP_PROXY listeners do not match ports"
    );
    assert_eq!(s.imports.as_ref().unwrap().ports(), [443]);
}

#[test]
fn host_patterns() {
    assert!(host_matches("*", "a.b"));
    assert!(host_matches("*.example.com", "api.example.com"));
    assert!(host_matches("*.example.com", "*.api.example.com"));
    assert!(!host_matches("*.example.com", "example.com"));
    assert!(host_matches("api.example.com", "api.example.com"));
    assert!(!host_matches("api.example.com", "www.example.com"));
    assert!(!host_matches("api.example.com", "*.example.com"));
}
