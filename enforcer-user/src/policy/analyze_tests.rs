use super::*;
use crate::{policy::check, sources::documents::parse_documents};

struct Case {
    checked: check::Checked,
    mesh: MeshSettings,
    namespaces: BTreeSet<String>,
    dns: Option<BTreeMap<String, Result<Vec<IpAddr>, String>>>,
}

impl Case {
    fn new(yaml: &str) -> Self {
        Self {
            checked: check::check(parse_documents("p.yaml", yaml)),
            mesh: MeshSettings {
                mode: OutboundMode::RegistryOnly,
                ..MeshSettings::default()
            },
            namespaces: BTreeSet::new(),
            dns: None,
        }
    }

    fn run(&self) -> Vec<Finding> {
        analyze(&Subject {
            entries: &self.checked.service_entries,
            workloads: &self.checked.workload_entries,
            sidecars: &self.checked.sidecars,
            gateways: &self.checked.gateways,
            virtual_services: &self.checked.virtual_services,
            destination_rules: &self.checked.destination_rules,
            mesh: &self.mesh,
            diagnostics: &self.checked.problems,
            namespaces: &self.namespaces,
            dns: self.dns.as_ref(),
            root_namespace: "istio-system",
            istio_compat: false,
        })
    }

    fn codes(&self) -> Vec<(&'static str, String)> {
        self.run().into_iter().map(|f| (f.code, f.object)).collect()
    }
}

fn se(ns: &str, name: &str, rest: &str) -> String {
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {rest}\n"
    )
}

fn sidecar(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

const API: &str =
    "{hosts: [api.example.com], ports: [{number: 443, name: tls, protocol: TLS}], resolution: DNS}";

#[test]
fn a_clean_policy_has_no_findings() {
    let mut case = Case::new(&se("shop", "api", API));
    case.dns = Some(BTreeMap::from([(
        "api.example.com".to_string(),
        Ok(vec!["203.0.113.30".parse().unwrap()]),
    )]));
    assert_eq!(case.codes(), []);
}

#[test]
fn exported_to_no_existing_namespace() {
    let yaml = se(
        "shop",
        "api",
        "{hosts: [api.example.com], ports: [{number: 443, name: tls, protocol: TLS}], resolution: DNS, exportTo: [ghost]}",
    );
    let mut case = Case::new(&yaml);
    let found = case.run();
    let f = found.iter().find(|f| f.code == "ENF0101").expect("ENF0101");
    assert_eq!(f.object, "ServiceEntry shop/api");
    assert_eq!(f.origin.as_deref(), Some("p.yaml"));
    assert!(f.message.contains("exportTo [ghost]"), "{f}");
    case.namespaces.insert("ghost".into());
    assert!(!case.codes().iter().any(|(c, _)| *c == "ENF0101"));
    let hidden = se("shop", "h", "{hosts: [h.example.com], ports: [{number: 1, name: t, protocol: TCP}], resolution: DNS, exportTo: ['~']}");
    assert!(Case::new(&hidden)
        .codes()
        .contains(&("ENF0101", "ServiceEntry shop/h".into())));
}

#[test]
fn same_host_and_port_with_different_resolution() {
    let yaml = se("shop", "a", API)
        + &se(
            "shop",
            "b",
            "{hosts: [api.example.com], ports: [{number: 443, name: tls, protocol: TLS}], resolution: STATIC, endpoints: [{address: 198.51.100.1}]}",
        )
        + &se(
            "other",
            "c",
            "{hosts: [api.example.com], ports: [{number: 443, name: tls, protocol: TLS}], resolution: NONE, addresses: [198.51.100.2]}",
        );
    let codes = Case::new(&yaml).codes();
    assert_eq!(
        codes
            .iter()
            .filter(|(c, _)| *c == "ENF0102")
            .collect::<Vec<_>>(),
        [&("ENF0102", "ServiceEntry shop/b".to_string())],
        "other/c is visible only in other, so it conflicts with nothing"
    );
}

#[test]
fn unresolved_hosts() {
    let mut case = Case::new(&se("shop", "api", API));
    case.dns = Some(BTreeMap::from([(
        "api.example.com".to_string(),
        Err("NXDOMAIN".to_string()),
    )]));
    let found = case.run();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].code, "ENF0103");
    assert!(found[0]
        .message
        .contains("api.example.com does not resolve (NXDOMAIN)"));
}

#[test]
fn registry_only_namespace_without_entries() {
    let mut case = Case::new(&se("shop", "api", API));
    case.namespaces.insert("empty".into());
    assert_eq!(case.codes(), [("ENF0104", "namespace empty".to_string())]);
    case.mesh.mode = OutboundMode::AllowAny;
    assert_eq!(case.codes(), []);
    // A Sidecar that imports nothing of what is visible counts as empty too.
    let yaml =
        se("shop", "api", API) + &sidecar("shop", "default", "{egress: [{hosts: ['platform/*']}]}");
    assert_eq!(
        Case::new(&yaml).codes(),
        [("ENF0104", "namespace shop".to_string())]
    );
}

#[test]
fn an_entry_without_ports_is_valid_and_allows_nothing() {
    let yaml = se(
        "shop",
        "portless",
        "{hosts: [api.example.com], resolution: DNS}",
    );
    // Its namespace, REGISTRY_ONLY, then imports nothing either.
    assert_eq!(
        Case::new(&yaml).codes(),
        [
            ("ENF0106", "ServiceEntry shop/portless".to_string()),
            ("ENF0104", "namespace shop".to_string())
        ]
    );
}

#[test]
fn workload_selector_matching_nothing() {
    let yaml = se(
        "shop",
        "vms",
        "{hosts: [app.internal.com], ports: [{number: 80, name: http, protocol: HTTP}], resolution: STATIC, workloadSelector: {labels: {app: vm}}}",
    );
    assert_eq!(
        Case::new(&yaml).codes(),
        [("ENF0105", "ServiceEntry shop/vms".to_string())]
    );
    let with_vm = yaml
        + "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm1, namespace: shop}\nspec: {address: 198.51.100.5, labels: {app: vm}}\n";
    assert_eq!(Case::new(&with_vm).codes(), []);
}

#[test]
fn sidecar_conflicts() {
    let otp = "{outboundTrafficPolicy: {mode: REGISTRY_ONLY}}";
    let yaml = se("shop", "api", API) + &sidecar("shop", "a", otp) + &sidecar("shop", "b", otp);
    let codes = Case::new(&yaml).codes();
    assert_eq!(
        codes,
        [
            ("IST0111", "Sidecar shop/a".to_string()),
            ("IST0111", "Sidecar shop/b".to_string())
        ]
    );
    let yaml = se("shop", "api", API)
        + &sidecar(
            "shop",
            "web",
            "{workloadSelector: {labels: {app: web}}, outboundTrafficPolicy: {mode: ALLOW_ANY}}",
        )
        + &sidecar(
            "shop",
            "v2",
            "{workloadSelector: {labels: {version: v2}}, outboundTrafficPolicy: {mode: ALLOW_ANY}}",
        )
        + &sidecar(
            "shop",
            "db",
            "{workloadSelector: {labels: {app: db}}, outboundTrafficPolicy: {mode: ALLOW_ANY}}",
        );
    let found = Case::new(&yaml).run();
    let conflicts: Vec<&Finding> = found.iter().filter(|f| f.code == "IST0110").collect();
    // web and v2 can both select {app: web, version: v2}; so can db and v2; web and db cannot.
    assert_eq!(conflicts.len(), 2, "{found:?}");
    assert!(conflicts
        .iter()
        .all(|f| f.message.contains("shop/v2") || f.object.ends_with("/v2")));
}

#[test]
fn none_without_addresses_and_schema_errors() {
    let yaml = se(
        "shop",
        "raw",
        "{hosts: [raw.example.com], ports: [{number: 9000, name: tcp, protocol: TCP}], resolution: NONE}",
    ) + &se("shop", "bad", "{hosts: [], ports: [{number: 1, name: t}]}");
    let found = Case::new(&yaml).run();
    let codes: Vec<&str> = found.iter().map(|f| f.code).collect();
    assert_eq!(codes, ["IST0106", "IST0134"], "{found:?}");
    assert_eq!(found[0].severity, Severity::Error);
    assert!(found[0].message.contains("spec.hosts"), "{}", found[0]);
    assert!(found[1]
        .to_string()
        .starts_with("Warning [IST0134] (ServiceEntry shop/raw p.yaml)"));
}
