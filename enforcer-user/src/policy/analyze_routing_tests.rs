use super::*;
use crate::{
    istio::OutboundMode,
    policy::{check, MeshSettings},
    sources::documents::parse_documents,
};
use std::collections::BTreeSet;

/// Seed 001, verbatim: the ServiceEntry of step 4, then the Gateway, DestinationRule and
/// VirtualService of step 5 (step 6 only observes). Objects without a namespace are in
/// `default`.
const SEED: &str = r#"apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata:
  name: wikipedia-egress
spec:
  hosts:
  - www.wikipedia.org
  ports:
  - number: 80
    name: http
    protocol: HTTP
  - number: 443
    name: https
    protocol: HTTPS
  resolution: DNS
---
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata:
  name: istio-egressgateway
  namespace: istio-system
spec:
  selector:
    istio: egressgateway
  servers:
  - port:
      number: 80
      name: http
      protocol: HTTP
    hosts:
    - www.wikipedia.org
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: egressgateway-for-wikipedia
  namespace: default
spec:
  host: istio-egressgateway.istio-system.svc.cluster.local
  subsets:
  - name: wikipedia
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: wikipedia-egress-gateway
spec:
  hosts:
  - www.wikipedia.org
  gateways:
  - istio-system/istio-egressgateway
  - mesh
  http:
  - match:
    - gateways:
      - mesh
      port: 80
    route:
    - destination:
        host: istio-egressgateway.istio-system.svc.cluster.local
        subset: wikipedia
        port:
          number: 80
      weight: 100
  - match:
    - gateways:
      - istio-system/istio-egressgateway
    port: 80
    route:
    - destination:
        host: www.wikipedia.org
        port:
          number: 80
      weight: 100
"#;

fn edit(yaml: &str, from: &str, to: &str) -> String {
    assert!(yaml.contains(from), "{from:?} is not in the YAML");
    yaml.replacen(from, to, 1)
}

fn run(yaml: &str) -> Vec<Finding> {
    let checked = check::check(parse_documents("seed.yaml", yaml));
    let mesh = MeshSettings {
        mode: OutboundMode::RegistryOnly,
        ..MeshSettings::default()
    };
    crate::policy::analyze::analyze(&Subject {
        entries: &checked.service_entries,
        workloads: &checked.workload_entries,
        sidecars: &checked.sidecars,
        gateways: &checked.gateways,
        virtual_services: &checked.virtual_services,
        destination_rules: &checked.destination_rules,
        mesh: &mesh,
        diagnostics: &checked.problems,
        namespaces: &BTreeSet::new(),
        dns: None,
        root_namespace: "istio-system",
        istio_compat: false,
    })
}

fn codes(findings: &[Finding]) -> Vec<(&'static str, &str)> {
    findings
        .iter()
        .map(|f| (f.code, f.object.as_str()))
        .collect()
}

fn only(findings: &[Finding], code: &str) -> Finding {
    let found: Vec<&Finding> = findings.iter().filter(|f| f.code == code).collect();
    assert_eq!(found.len(), 1, "one {code}: {findings:#?}");
    found[0].clone()
}

/// Exported to the gateway's namespace, the seed has no routing finding left.
fn exported(yaml: &str) -> String {
    edit(
        yaml,
        "  resolution: DNS\n",
        "  resolution: DNS\n  exportTo: [\".\", istio-system]\n",
    )
}

const VS: &str = "VirtualService default/wikipedia-egress-gateway";

#[test]
fn seed_001_steps_5_6_warns_of_its_port_and_of_the_export_to_the_gateway() {
    let found = run(SEED);
    assert_eq!(
        codes(&found),
        [
            ("IST0106", VS),
            ("ENF0111", "ServiceEntry default/wikipedia-egress")
        ],
        "{found:#?}"
    );
    let port = &found[0];
    assert_eq!(port.severity, Severity::Warning);
    assert!(
        port.message.contains("spec.http[1].port: unknown field"),
        "{port}"
    );
    let export = &found[1];
    assert_eq!(export.severity, Severity::Warning);
    assert!(
        export
            .message
            .starts_with("spec.exportTo: [.] does not include istio-system"),
        "{export}"
    );
    assert!(
        export
            .message
            .contains("Gateway istio-system/istio-egressgateway"),
        "{export}"
    );
    assert!(
        export.message.contains("spec.http[1].route[0].destination"),
        "{export}"
    );
    assert!(export.fix.contains("\"istio-system\""), "{export}");

    assert_eq!(codes(&run(&exported(SEED))), [("IST0106", VS)]);
}

#[test]
fn a_route_to_the_gateway_without_mesh_bypasses_it() {
    // The seed's warning: without mesh in spec.gateways nothing in the mesh follows the route.
    let yaml = edit(&exported(SEED), "  - mesh\n  http:", "  http:");
    let f = only(&run(&yaml), "ENF0107");
    assert_eq!(f.object, VS);
    assert!(f.message.starts_with("spec.http[0].route[0].destination: routes to the service of egress Gateway istio-system/istio-egressgateway, but mesh is not in spec.gateways"), "{f}");

    // A match's gateways narrow the top-level list: naming only the gateway drops the mesh.
    let yaml = edit(
        &exported(SEED),
        "      - mesh\n      port: 80",
        "      - istio-system/istio-egressgateway\n      port: 80",
    );
    let f = only(&run(&yaml), "ENF0107");
    assert!(
        f.message
            .contains("mesh is not in spec.http[0].match gateways"),
        "{f}"
    );
}

#[test]
fn a_gateway_that_does_not_exist_is_an_error() {
    let yaml = edit(
        &exported(SEED),
        "  - istio-system/istio-egressgateway\n  - mesh",
        "  - istio-system/egressgateway\n  - mesh",
    );
    let found = run(&yaml);
    let f = only(&found, "ENF0108");
    assert_eq!(f.severity, Severity::Error);
    assert!(
        f.message
            .starts_with("spec.gateways[0]: Gateway istio-system/egressgateway does not exist"),
        "{f}"
    );
    // The match still names the real one; no host check against a Gateway that is not there.
    assert!(found.iter().all(|f| f.code != "ENF0109"), "{found:#?}");

    let yaml = edit(
        &exported(SEED),
        "      - istio-system/istio-egressgateway\n    port",
        "      - egw\n    port",
    );
    let f = only(&run(&yaml), "ENF0108");
    assert!(
        f.message
            .starts_with("spec.http[1].match[0].gateways[0]: Gateway default/egw does not exist"),
        "{f}"
    );
}

#[test]
fn a_host_no_server_of_the_gateway_takes_is_reported() {
    for (server_host, reported) in [
        ("api.example.com", true),
        ("*.wikipedia.org", false),
        ("default/www.wikipedia.org", false),
        ("shop/www.wikipedia.org", true),
        // `.` is the Gateway's namespace, istio-system, not the VirtualService's.
        ("./www.wikipedia.org", true),
        ("*/*", false),
    ] {
        let yaml = edit(
            &exported(SEED),
            "    - www.wikipedia.org\n",
            &format!("    - '{server_host}'\n"),
        );
        let found = run(&yaml);
        let got: Vec<&Finding> = found.iter().filter(|f| f.code == "ENF0109").collect();
        assert_eq!(
            got.len(),
            usize::from(reported),
            "{server_host}: {found:#?}"
        );
        if let Some(f) = got.first() {
            assert!(f.message.starts_with("spec.gateways[0]: no server host of Gateway istio-system/istio-egressgateway matches"), "{f}");
        }
    }
}

#[test]
fn a_subset_no_destination_rule_defines_is_an_error() {
    let yaml = edit(&exported(SEED), "  - name: wikipedia", "  - name: wiki");
    let f = only(&run(&yaml), "ENF0110");
    assert_eq!(f.severity, Severity::Error);
    assert!(f.message.starts_with("spec.http[0].route[0].destination.subset: no DestinationRule for istio-egressgateway.istio-system.svc.cluster.local defines subset wikipedia"), "{f}");
}

#[test]
fn a_client_originating_tls_to_the_gateway_is_an_error() {
    let subsets = "  subsets:\n  - name: wikipedia";
    for (rule, field) in [
        ("  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}\n  subsets:\n  - name: wikipedia", Some("spec.trafficPolicy.tls.mode: ISTIO_MUTUAL")),
        ("  subsets:\n  - name: wikipedia\n    trafficPolicy: {tls: {mode: SIMPLE}}", Some("spec.subsets[0].trafficPolicy.tls.mode: SIMPLE")),
        ("  trafficPolicy: {portLevelSettings: [{port: {number: 80}, tls: {mode: ISTIO_MUTUAL, sni: www.wikipedia.org}}]}\n  subsets:\n  - name: wikipedia", Some("spec.trafficPolicy.portLevelSettings[0].tls.mode: ISTIO_MUTUAL")),
        // The egress TLS-origination task's shape: a subset's port setting.
        ("  subsets:\n  - name: wikipedia\n    trafficPolicy: {portLevelSettings: [{port: {number: 80}, tls: {mode: MUTUAL, credentialName: c}}]}", Some("spec.subsets[0].trafficPolicy.portLevelSettings[0].tls.mode: MUTUAL")),
        // Another port than the routed 80.
        ("  trafficPolicy: {portLevelSettings: [{port: {number: 443}, tls: {mode: ISTIO_MUTUAL}}]}\n  subsets:\n  - name: wikipedia", None),
        // The subset's DISABLE overrides the rule's.
        ("  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}\n  subsets:\n  - name: wikipedia\n    trafficPolicy: {tls: {mode: DISABLE}}", None),
    ] {
        let found = run(&edit(&exported(SEED), subsets, rule));
        let got: Vec<&Finding> = found.iter().filter(|f| f.code == "ENF0112").collect();
        match field {
            None => assert!(got.is_empty(), "{rule}: {found:#?}"),
            Some(field) => {
                assert_eq!(got.len(), 1, "{rule}: {found:#?}");
                assert_eq!(got[0].severity, Severity::Error);
                assert_eq!(got[0].object, "DestinationRule default/egressgateway-for-wikipedia");
                assert!(got[0].message.starts_with(field), "{}", got[0]);
                assert!(got[0].message.contains("enforcer refuses these connections"), "{}", got[0]);
            }
        }
    }
}

#[test]
fn resolution_none_for_a_host_the_gateway_forwards_to_loops() {
    let yaml = edit(
        &exported(SEED),
        "  resolution: DNS\n",
        "  resolution: NONE\n",
    );
    let f = only(&run(&yaml), "ENF0113");
    assert_eq!(f.object, "ServiceEntry default/wikipedia-egress");
    assert!(f.message.starts_with("spec.resolution: NONE for www.wikipedia.org, which Gateway istio-system/istio-egressgateway forwards to"), "{f}");
}

#[test]
fn an_entry_the_gateway_cannot_see_does_not_make_it_loop() {
    // A namespace-local wildcard entry for the clients (seed 003's) is not what the gateway
    // connects by: it sees only the entry exported to its namespace.
    let wildcard = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: wiki-all, namespace: default}\nspec: {hosts: ['*.wikipedia.org'], ports: [{number: 80, name: http, protocol: HTTP}], resolution: NONE}\n";
    let found = run(&format!("{}---\n{wildcard}", exported(SEED)));
    assert!(!found.iter().any(|f| f.code == "ENF0113"), "{found:?}");
}

#[test]
fn a_gateway_service_that_selects_pods_is_not_said_to_allow_nothing() {
    let service = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: istio-egressgateway, namespace: istio-system}\nspec: {hosts: [istio-egressgateway.istio-system.svc.cluster.local], exportTo: ['*'], resolution: STATIC, ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}], workloadSelector: {labels: {istio: egressgateway}}}\n";
    let found = run(&format!("{}---\n{service}", exported(SEED)));
    assert!(!found.iter().any(|f| f.code == "ENF0105"), "{found:?}");
    // Without the Gateway, a selector that matches no WorkloadEntry still warns.
    let other = service.replace("istio: egressgateway", "app: nothing");
    let found = run(&format!("{}---\n{other}", exported(SEED)));
    assert!(found.iter().any(|f| f.code == "ENF0105"), "{found:?}");
}

#[test]
fn per_request_predicates_on_a_mesh_route_to_the_gateway_warn() {
    let yaml = edit(
        &exported(SEED),
        "      - mesh\n      port: 80",
        "      - mesh\n      port: 80\n      uri: {prefix: /wiki}",
    );
    let f = only(&run(&yaml), "ENF0114");
    assert!(
        f.message
            .starts_with("spec.http[0].match[0]: uri decides per request"),
        "{f}"
    );
    // On the gateway's side the gateway's proxy decides per request: no finding.
    let yaml = edit(
        &exported(SEED),
        "      - istio-system/istio-egressgateway\n    port",
        "      - istio-system/istio-egressgateway\n      uri: {prefix: /wiki}\n    port",
    );
    assert!(run(&yaml).iter().all(|f| f.code != "ENF0114"));
}

/// An ingress route to an in-mesh service with subsets and mTLS is not a route to an egress
/// gateway: no finding of this module.
#[test]
fn an_ingress_route_with_subsets_and_mutual_tls_is_not_taken_for_egress() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bookinfo-gateway, namespace: shop}
spec: {selector: {istio: ingressgateway}, servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ['*']}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec: {hosts: [reviews], gateways: [bookinfo-gateway, mesh], http: [{match: [{uri: {prefix: /v2}}], route: [{destination: {host: reviews, subset: v2}}]}, {route: [{destination: {host: reviews, subset: v1}}]}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec: {host: reviews.shop.svc.cluster.local, trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}
"#;
    assert_eq!(codes(&run(yaml)), []);
}

/// Local mode: the gateway's Service is a ServiceEntry whose endpoint carries the Gateway's
/// selector, under a name unlike the Gateway's.
#[test]
fn a_service_entry_with_the_gateways_labels_is_its_service() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: egw, namespace: egress}
spec: {selector: {app: egress-proxy}, servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [api.example.com]}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: proxy, namespace: shop}
spec: {hosts: [proxy.internal], ports: [{number: 8080, name: http, protocol: HTTP}], resolution: STATIC, endpoints: [{address: 192.0.2.8, labels: {app: egress-proxy}}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: shop}
spec: {hosts: [api.example.com], gateways: [egress/egw], http: [{route: [{destination: {host: proxy.internal, port: {number: 8080}}}]}]}
"#;
    let f = only(&run(yaml), "ENF0107");
    assert!(f.message.contains("egress Gateway egress/egw"), "{f}");
}

/// The analyzer takes the DestinationRule the compiler applies: the clients' namespace's, else
/// the service's when exported to them; not any rule for the host.
#[test]
fn the_destination_rule_the_clients_use_decides() {
    let moved = edit(
        &exported(SEED),
        "  name: egressgateway-for-wikipedia\n  namespace: default\nspec:\n  host: istio-egressgateway.istio-system.svc.cluster.local\n  subsets:",
        "  name: egressgateway-for-wikipedia\n  namespace: istio-system\nspec:\n  host: istio-egressgateway\n  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}\n  subsets:",
    );
    let f = only(&run(&moved), "ENF0112");
    assert_eq!(
        f.object,
        "DestinationRule istio-system/egressgateway-for-wikipedia"
    );

    let private = edit(
        &moved,
        "  host: istio-egressgateway\n",
        "  host: istio-egressgateway\n  exportTo: [\".\"]\n",
    );
    let found = run(&private);
    assert!(found.iter().all(|f| f.code != "ENF0112"), "{found:#?}");
    let f = only(&found, "ENF0110");
    assert!(f.message.contains("defines subset wikipedia"), "{f}");
}

/// A mesh route in a VirtualService bound to no Gateway is not redirected, whatever its
/// destination is called: nothing to report about the gateway.
#[test]
fn a_route_to_a_gateways_service_without_a_gateway_bound_is_not_a_redirect() {
    let yaml = edit(
        &exported(SEED),
        "  - istio-system/istio-egressgateway\n  - mesh\n",
        "  - mesh\n",
    );
    let yaml = edit(
        &yaml,
        "  subsets:\n  - name: wikipedia",
        "  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}\n  subsets:\n  - name: wikipedia",
    );
    let found = run(&yaml);
    assert!(found.iter().all(|f| f.code != "ENF0112"), "{found:#?}");
}
