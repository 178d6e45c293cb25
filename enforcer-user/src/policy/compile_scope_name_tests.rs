//! Scope names: long ones are a namespace prefix and a hash, and two scopes that end up with
//! one name are both refused, never one given the other's policy.

use super::*;
use crate::policy::{decide::decide, model::scope_name_with};

/// Two namespaces that share their first 44 bytes, each with a long-named Sidecar selecting
/// `app: web` and an entry of its own, and one short-named Sidecar.
fn two_long_sidecars() -> (Case, String, String) {
    let east = format!("{}-east", "a".repeat(44));
    let west = format!("{}-west", "a".repeat(44));
    let sidecar = |ns: &str, name: &str, app: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  workloadSelector: {{labels: {{app: {app}}}}}\n"
        )
    };
    let entry = |ns: &str, addr: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: svc, namespace: {ns}}}\nspec: {{hosts: [svc.{ns}.example.com], addresses: [{addr}], ports: [{{number: 443, name: https}}], resolution: STATIC}}\n"
        )
    };
    let long = format!("web-{}", "x".repeat(20));
    let yaml = [
        sidecar(&east, &long, "web"),
        sidecar(&west, &long, "web"),
        sidecar(&east, "db", "db"),
        entry(&east, "198.51.100.10"),
        entry(&west, "203.0.113.30"),
    ]
    .join("---\n");
    (Case::new(&yaml), east, west)
}

fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_string(), app.to_string())])
}

/// Every long name hashes to 0: the scopes of the two long Sidecars collide.
fn colliding(namespace: &str, sidecar: Option<&str>) -> String {
    scope_name_with(namespace, sidecar, |_| 0)
}

#[test]
fn colliding_scope_names_refuse_both_scopes() {
    let (case, east, west) = two_long_sidecars();
    let d = case.compile_named(colliding);
    let shared = format!("{}/~{:016x}", "a".repeat(44), 0);
    let web = labels("web");
    assert_eq!(d.scope_for(&east, &web), Some(shared.as_str()));
    assert_eq!(d.scope_for(&west, &web), Some(shared.as_str()));
    let scope = &d.scopes[&shared];
    assert!(scope.rules.is_empty(), "{:?}", scope.rules);
    assert_eq!(scope.mode, OutboundMode::RegistryOnly);
    for (ns, ip) in [(&east, "198.51.100.10"), (&west, "203.0.113.30")] {
        let got = decide(&d, &shared, ip.parse().unwrap(), 443, L4::Tcp);
        assert!(!got.allowed, "{ns}'s web workloads reach {ip}: {got:?}");
        assert!(
            format!("{:?}", got.because).contains("sharing one scope name"),
            "{got:?}"
        );
    }
    let long = format!("web-{}", "x".repeat(20));
    let note = d
        .notes
        .iter()
        .find(|n| n.contains(&shared))
        .expect("a note about the shared name");
    assert!(
        note.contains(&format!("Sidecar {east}/{long}"))
            && note.contains(&format!("Sidecar {west}/{long}")),
        "{note}"
    );

    // The rest keeps its policy: the namespaces' own scopes, and the short-named Sidecar.
    assert_eq!(rules(&d, &east), ["198.51.100.10:443/tcp"]);
    assert_eq!(rules(&d, &west), ["203.0.113.30:443/tcp"]);
    let db = d.scope_for(&east, &labels("db")).unwrap_or_default();
    assert_eq!(db, format!("{east}/db"));
    assert_eq!(rules(&d, db), ["198.51.100.10:443/tcp"]);
}

#[test]
fn distinct_scope_names_are_not_refused() {
    let (case, east, west) = two_long_sidecars();
    let d = case.compile();
    let web = labels("web");
    let (a, b) = (d.scope_for(&east, &web), d.scope_for(&west, &web));
    assert!(a.is_some() && b.is_some() && a != b, "{a:?} {b:?}");
    assert_eq!(rules(&d, a.unwrap_or_default()), ["198.51.100.10:443/tcp"]);
    assert_eq!(rules(&d, b.unwrap_or_default()), ["203.0.113.30:443/tcp"]);
    assert!(
        d.notes.iter().all(|n| !n.contains("one scope name")),
        "{:?}",
        d.notes
    );
}
