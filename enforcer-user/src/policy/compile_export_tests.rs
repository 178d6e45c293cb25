//! Visibility: exportTo, the mesh default, and Services next to ServiceEntries.

use super::*;

#[test]
fn namespace_local_by_default() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: postgres-db, namespace: frontend}
spec:
  hosts: [db.example.com]
  ports: [{number: 5432, name: db, protocol: TCP}]
  resolution: DNS
"#;
    let d = Case::new(yaml)
        .dns("db.example.com", &["198.51.100.20"])
        .compile();
    assert_eq!(rules(&d, "frontend"), sorted(["198.51.100.20:5432/tcp"]));
    assert!(
        rules(&d, "default").is_empty(),
        "default must not see frontend's entry"
    );
    let refs = &d.hosts_by_ip[&"198.51.100.20".parse::<IpAddr>().unwrap()];
    assert_eq!(
        refs.iter().next().unwrap().visible_to,
        Some(["frontend".to_string()].into())
    );
}

#[test]
fn export_to_star_list_and_none() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: all, namespace: a}
spec: {hosts: [all.example.com], addresses: [192.0.2.1], ports: [{number: 1, name: p}], exportTo: ["*"]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: some, namespace: a}
spec: {hosts: [some.example.com], addresses: [192.0.2.2], ports: [{number: 2, name: p}], exportTo: [".", "b"]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: hidden, namespace: a}
spec: {hosts: [hidden.example.com], addresses: [192.0.2.3], ports: [{number: 3, name: p}], exportTo: ["~"]}
"#;
    let d = Case::new(yaml).ns(&["c"]).compile();
    assert_eq!(
        rules(&d, "a"),
        sorted(["192.0.2.1:1/tcp", "192.0.2.2:2/tcp"])
    );
    assert_eq!(
        rules(&d, "b"),
        sorted(["192.0.2.1:1/tcp", "192.0.2.2:2/tcp"])
    );
    assert_eq!(rules(&d, "c"), sorted(["192.0.2.1:1/tcp"]));
    assert_eq!(rules(&d, "default"), sorted(["192.0.2.1:1/tcp"]));
}

#[test]
fn mesh_default_export_to_applies_when_absent() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: e, namespace: a}
spec: {hosts: [e.example.com], addresses: [192.0.2.5], ports: [{number: 9, name: p}]}
"#;
    let mut c = Case::new(yaml);
    c.mesh.default_export_to = Some(vec!["*".into()]);
    assert_eq!(rules(&c.compile(), "default"), ["192.0.2.5:9/tcp"]);
}

/// A user ServiceEntry and a Service's entry (as `k8s::registry` makes it) in namespace `a`.
fn entry_and_service(service_export_to: &str) -> Case {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: e, namespace: a}
spec: {hosts: [e.example.com], addresses: [192.0.2.5], ports: [{number: 9, name: p}]}
"#;
    let service = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: api, namespace: a}}\nspec: {{hosts: [api.a.svc.cluster.local], addresses: [10.96.0.10], ports: [{{number: 80, name: tcp-80, protocol: TCP}}], resolution: STATIC{service_export_to}}}\n"
    );
    let mut snap = crate::sources::Snapshot::default();
    let value = serde_yaml::from_str(&service).expect("yaml");
    crate::sources::documents::parse_service("k8s", "Service a/api", value, &mut snap);
    let mut c = Case::new(yaml).ns(&["a", "b"]);
    c.ses.extend(snap.service_entries);
    c
}

#[test]
fn services_are_visible_everywhere_and_service_entries_locally_by_default() {
    let d = entry_and_service("").compile();
    assert_eq!(
        rules(&d, "b"),
        ["10.96.0.10:80/tcp"],
        "Istio's * for Services"
    );
    assert_eq!(
        rules(&d, "a"),
        sorted(["10.96.0.10:80/tcp", "192.0.2.5:9/tcp"])
    );
    let d = entry_and_service(", exportTo: ['.']").compile();
    assert!(rules(&d, "b").is_empty(), "the annotation wins");
}

#[test]
fn a_mesh_default_export_to_applies_to_services_too() {
    let mut c = entry_and_service("");
    c.mesh.default_export_to = Some(vec![".".into()]);
    assert!(rules(&c.compile(), "b").is_empty());
    c.mesh.default_export_to = Some(vec!["*".into()]);
    assert_eq!(
        rules(&c.compile(), "b"),
        sorted(["10.96.0.10:80/tcp", "192.0.2.5:9/tcp"])
    );
    let mut c = entry_and_service(", exportTo: ['*']");
    c.mesh.default_export_to = Some(vec![".".into()]);
    assert_eq!(
        rules(&c.compile(), "b"),
        ["10.96.0.10:80/tcp"],
        "the annotation still wins"
    );
}
