//! Seed 001 steps 5 and 6, and the cases around them, compiled without a kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use super::*;
use crate::{
    datapath::plan::PodAssignment,
    istio::OutboundMode,
    observe::status::Inputs as StatusInputs,
    policy::{Desired, Rule, L4},
    sources::{documents::parse_documents, Sources},
};

const WIKI_IP: &str = "203.0.113.10";
const WIKI_IP6: &str = "2001:db8::10";
const GATEWAY_POD: &str = "10.240.0.9";
const GATEWAY_POD6: &str = "fd00:240::9";
const GW_SCOPE: &str = "istio-system/gateway:istio=egressgateway";

/// Step 4's entry, exported to the gateway's namespace too (Istio's default `*` would).
const ENTRY: &str = r#"
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: wikipedia-egress, namespace: default}
spec:
  hosts: [www.wikipedia.org]
  exportTo: [".", istio-system]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 443, name: https, protocol: HTTPS}
  resolution: DNS
"#;

/// The gateway's Service, as local mode expresses it: its pods by label.
const SERVICE: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: istio-egressgateway, namespace: istio-system}
spec:
  hosts: [istio-egressgateway.istio-system.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  exportTo: ["*"]
  ports:
  - {number: 80, name: http2, protocol: HTTP2, targetPort: 8080}
  - {number: 443, name: https, protocol: HTTPS, targetPort: 8443}
  workloadSelector: {labels: {istio: egressgateway}}
"#;

/// Step 5, as the seed writes it (the misplaced `port` included).
const STEP5: &str = r#"
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata: {name: istio-egressgateway, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [www.wikipedia.org]
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: egressgateway-for-wikipedia, namespace: default}
spec:
  host: istio-egressgateway.istio-system.svc.cluster.local
  subsets:
  - name: wikipedia
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: wikipedia-egress-gateway, namespace: default}
spec:
  hosts: [www.wikipedia.org]
  gateways: [istio-system/istio-egressgateway, mesh]
  http:
  - match:
    - gateways: [mesh]
      port: 80
    route:
    - destination:
        host: istio-egressgateway.istio-system.svc.cluster.local
        subset: wikipedia
        port: {number: 80}
      weight: 100
  - match:
    - gateways: [istio-system/istio-egressgateway]
    port: 80
    route:
    - destination:
        host: www.wikipedia.org
        port: {number: 80}
      weight: 100
"#;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn gateway_pods() -> Vec<PodAssignment> {
    [GATEWAY_POD, GATEWAY_POD6]
        .iter()
        .map(|a| PodAssignment {
            ip: ip(a),
            namespace: "istio-system".into(),
            labels: BTreeMap::from([("istio".into(), "egressgateway".into())]),
            pod: None,
        })
        .collect()
}

/// Compiles YAML documents with the gateway pod running and www.wikipedia.org answered.
fn compile_with(yaml: &str, mode: OutboundMode, gateway_only: bool) -> Desired {
    compile_inputs(
        yaml,
        mode,
        StatusInputs {
            egress_gateway_only: gateway_only,
            ..StatusInputs::default()
        },
    )
}

/// [`compile_with`], with the gateway flags of `flags`.
fn compile_inputs(yaml: &str, mode: OutboundMode, flags: StatusInputs) -> Desired {
    let sources = Sources::from_snapshot(parse_documents("test.yaml", yaml));
    let errors: Vec<&String> = sources
        .problems
        .iter()
        .filter(|p| !p.starts_with("warning"))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    let mut sources = sources;
    sources.mesh.mode = mode;
    let inputs = StatusInputs {
        root_namespace: "istio-system".into(),
        namespaces: BTreeSet::from(["default".into(), "istio-system".into()]),
        answers: BTreeMap::from([("www.wikipedia.org".into(), vec![ip(WIKI_IP), ip(WIKI_IP6)])]),
        endpoint_pods: gateway_pods(),
        ..flags
    };
    sources.compile(&inputs)
}

/// The entry, the gateway's Service and `routing` (step 5 or a variant), REGISTRY_ONLY.
fn routed(routing: &str) -> Desired {
    compile_with(
        &format!("{ENTRY}---{SERVICE}---{routing}"),
        OutboundMode::RegistryOnly,
        false,
    )
}

fn seed() -> Desired {
    routed(STEP5)
}

fn key(port: u16, addr: &str) -> RedirectKey {
    RedirectKey { port, ip: ip(addr) }
}

#[test]
fn the_seeds_mesh_route_redirects_port_80_to_the_gateway_pods_target_port() {
    let d = seed();
    let default = &d.scopes["default"];
    let route = &default.redirects[&key(80, WIKI_IP)];
    assert_eq!(route.virtual_service, "default/wikipedia-egress-gateway");
    assert_eq!(route.gateway, "istio-system/istio-egressgateway");
    assert_eq!(route.host, "www.wikipedia.org");
    let Via::Gateway(targets) = &route.via else {
        panic!("not redirected: {:?}", route.via);
    };
    let want: Vec<std::net::SocketAddr> = vec![
        format!("{GATEWAY_POD}:8080").parse().unwrap(),
        format!("[{GATEWAY_POD6}]:8080").parse().unwrap(),
    ];
    assert_eq!(targets, &want);
    assert!(default.redirects.contains_key(&key(80, WIKI_IP6)));
    // Only the matched port, as in Istio: 443 stays direct.
    assert!(!default.redirects.contains_key(&key(443, WIKI_IP)));
    assert!(default
        .rules
        .contains_key(&Rule::host(L4::Tcp, 443, ip(WIKI_IP))));
    // The client may reach the gateway's pods on their port.
    assert!(default
        .rules
        .contains_key(&Rule::host(L4::Tcp, 8080, ip(GATEWAY_POD))));
}

#[test]
fn gateway_workloads_get_their_own_scope_reaching_only_routed_destinations() {
    let d = seed();
    let scope = &d.scopes[GW_SCOPE];
    assert_eq!(scope.mode, OutboundMode::RegistryOnly);
    assert_eq!(
        scope.gateway.as_deref(),
        Some("Gateway istio-system/istio-egressgateway")
    );
    assert!(scope.redirects.is_empty(), "a gateway is never redirected");
    let tcp: Vec<&Rule> = scope.rules.keys().filter(|r| r.l4 == L4::Tcp).collect();
    assert_eq!(
        tcp,
        [
            &Rule::host(L4::Tcp, 80, ip(WIKI_IP)),
            &Rule::host(L4::Tcp, 80, ip(WIKI_IP6))
        ],
        "port 80 of the routed host only"
    );
    let labels = BTreeMap::from([("istio".to_string(), "egressgateway".to_string())]);
    assert_eq!(d.scope_for("istio-system", &labels), Some(GW_SCOPE));
    assert_eq!(
        d.scope_for("istio-system", &BTreeMap::new()),
        Some("istio-system")
    );
    // Not in a tenant's namespace: labelling its pods would take them around the gateway.
    assert_eq!(d.scope_for("default", &labels), Some("default"));
    // Istio's default, on request: selected in any namespace.
    let any = compile_inputs(
        &format!("{ENTRY}---{SERVICE}---{STEP5}"),
        OutboundMode::RegistryOnly,
        StatusInputs {
            gateway_any_namespace: true,
            ..StatusInputs::default()
        },
    );
    assert_eq!(
        any.scope_for("default", &labels),
        Some("default/gateway:istio=egressgateway")
    );
}

#[test]
fn an_entry_not_exported_to_the_gateways_namespace_is_not_reachable_from_it() {
    let entry = ENTRY.replace("exportTo: [\".\", istio-system]", "exportTo: [\".\"]");
    let d = compile_with(
        &format!("{entry}---{SERVICE}---{STEP5}"),
        OutboundMode::RegistryOnly,
        false,
    );
    assert!(d.scopes[GW_SCOPE]
        .rules
        .keys()
        .all(|r| r.l4 == L4::Udp || r.port != 80));
    // The client is still redirected: Istio's gateway answers 503 NC, here the gateway's
    // connect is refused.
    assert!(d.scopes["default"]
        .redirects
        .contains_key(&key(80, WIKI_IP)));
}

#[test]
fn without_mesh_nothing_is_redirected() {
    let vs = STEP5.replace(
        "    - gateways: [mesh]\n",
        "    - gateways: [istio-system/istio-egressgateway]\n",
    );
    let vs = vs.replace(
        "gateways: [istio-system/istio-egressgateway, mesh]",
        "gateways: [istio-system/istio-egressgateway]",
    );
    let d = routed(&vs);
    assert!(d.scopes["default"].redirects.is_empty());
}

#[test]
fn redirects_apply_in_allow_any_and_audit_too() {
    for mode in [OutboundMode::AllowAny, OutboundMode::Audit] {
        let d = compile_with(&format!("{ENTRY}---{SERVICE}---{STEP5}"), mode, false);
        assert!(
            d.scopes["default"]
                .redirects
                .contains_key(&key(80, WIKI_IP)),
            "{mode}"
        );
        assert_eq!(d.scopes[GW_SCOPE].mode, OutboundMode::RegistryOnly);
    }
}

#[test]
fn client_tls_towards_the_gateway_fails_closed_with_the_reason() {
    let dr = STEP5.replace(
        "  - name: wikipedia\n",
        "  - name: wikipedia\n    trafficPolicy:\n      portLevelSettings:\n      - port: {number: 80}\n        tls: {mode: ISTIO_MUTUAL, sni: www.wikipedia.org}\n",
    );
    let d = routed(&dr);
    let route = &d.scopes["default"].redirects[&key(80, WIKI_IP)];
    let Via::Refused(why) = &route.via else {
        panic!("{:?}", route.via);
    };
    assert!(why.contains("ISTIO_MUTUAL"), "{why}");
    assert!(why.contains("default/egressgateway-for-wikipedia"), "{why}");
}

#[test]
fn a_missing_subset_or_subset_labels_that_select_no_pod_refuse() {
    let missing = STEP5.replace("subset: wikipedia", "subset: nowhere");
    let d = routed(&missing);
    let via = &d.scopes["default"].redirects[&key(80, WIKI_IP)].via;
    assert!(
        matches!(via, Via::Refused(w) if w.contains("subset nowhere")),
        "{via:?}"
    );

    let labelled = STEP5.replace(
        "  - name: wikipedia\n",
        "  - name: wikipedia\n    labels: {version: v2}\n",
    );
    let d = routed(&labelled);
    let via = &d.scopes["default"].redirects[&key(80, WIKI_IP)].via;
    assert!(
        matches!(via, Via::Refused(w) if w.contains("no endpoint")),
        "{via:?}"
    );
}

#[test]
fn gateway_only_refuses_every_other_port_of_a_routed_host() {
    let d = compile_with(
        &format!("{ENTRY}---{SERVICE}---{STEP5}"),
        OutboundMode::RegistryOnly,
        true,
    );
    let route = &d.scopes["default"].redirects[&key(0, WIKI_IP)];
    assert_eq!(route.via, Via::GatewayOnly);
    assert!(d.scopes[GW_SCOPE].redirects.is_empty());
}

#[test]
fn tls_passthrough_routes_redirect_the_sni_hosts_to_the_gateways_tls_port() {
    let tls = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: istio-egressgateway, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  servers:
  - port: {number: 443, name: tls, protocol: TLS}
    hosts: [www.wikipedia.org]
    tls: {mode: PASSTHROUGH}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: wikipedia-tls, namespace: default}
spec:
  hosts: [www.wikipedia.org]
  gateways: [mesh, istio-system/istio-egressgateway]
  tls:
  - match:
    - {gateways: [mesh], port: 443, sniHosts: [www.wikipedia.org]}
    route:
    - destination: {host: istio-egressgateway.istio-system.svc.cluster.local, port: {number: 443}}
  - match:
    - {gateways: [istio-system/istio-egressgateway], port: 443, sniHosts: [www.wikipedia.org]}
    route:
    - destination: {host: www.wikipedia.org, port: {number: 443}}
"#;
    let d = routed(tls);
    let route = &d.scopes["default"].redirects[&key(443, WIKI_IP)];
    assert!(
        matches!(&route.via, Via::Gateway(t) if t.iter().all(|a| a.port() == 8443)),
        "{:?}",
        route.via
    );
    assert!(!d.scopes["default"]
        .redirects
        .contains_key(&key(80, WIKI_IP)));
    assert!(d.scopes[GW_SCOPE]
        .rules
        .contains_key(&Rule::host(L4::Tcp, 443, ip(WIKI_IP))));
}

#[test]
fn a_learning_scope_does_not_learn_a_routed_hosts_port() {
    let wildcard = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wiki-all, namespace: default}
spec:
  hosts: ["*.wikipedia.org"]
  ports: [{number: 80, name: http, protocol: HTTP}, {number: 443, name: https, protocol: HTTPS}]
  resolution: NONE
"#;
    let d = compile_with(
        &format!("{wildcard}---{ENTRY}---{SERVICE}---{STEP5}"),
        OutboundMode::RegistryOnly,
        false,
    );
    let learn = &d.scopes["default"].learn;
    assert!(!learn.is_empty());
    for rule in learn.iter().filter(|r| r.hosts.covers("www.wikipedia.org")) {
        assert!(!rule.ports.contains(&(L4::Tcp, 80)), "{rule:?}");
        assert!(rule.ports.contains(&(L4::Tcp, 443)), "{rule:?}");
    }
}

#[test]
fn a_match_cannot_add_mesh_to_the_virtual_services_gateways() {
    // Istio indexes a VirtualService under spec.gateways only: the match's mesh binds nothing.
    let vs = STEP5.replace(
        "gateways: [istio-system/istio-egressgateway, mesh]",
        "gateways: [istio-system/istio-egressgateway]",
    );
    let d = routed(&vs);
    assert!(d.scopes["default"].redirects.is_empty());
}

#[test]
fn a_mesh_route_to_one_of_the_routed_hosts_is_left_direct() {
    // Port 443 goes straight to www.wikipedia.org, as in Istio; it is no gateway's service.
    let vs = STEP5.replace(
        "  - match:\n    - gateways: [istio-system/istio-egressgateway]\n",
        "  - match:\n    - {gateways: [mesh], port: 443}\n    route:\n    - destination: {host: www.wikipedia.org, port: {number: 443}}\n  - match:\n    - gateways: [istio-system/istio-egressgateway]\n",
    );
    let d = routed(&vs);
    let redirects = &d.scopes["default"].redirects;
    assert!(!redirects.contains_key(&key(443, WIKI_IP)), "{redirects:?}");
    assert!(matches!(redirects[&key(80, WIKI_IP)].via, Via::Gateway(_)));
}

#[test]
fn the_destination_rule_is_found_by_short_name_in_the_services_namespace() {
    let moved = STEP5.replace(
        "namespace: default}\nspec:\n  host: istio-egressgateway.istio-system.svc.cluster.local",
        "namespace: istio-system}\nspec:\n  host: istio-egressgateway",
    );
    let d = routed(&moved);
    let via = &d.scopes["default"].redirects[&key(80, WIKI_IP)].via;
    assert!(matches!(via, Via::Gateway(_)), "{via:?}");

    // Kept to its own namespace, it defines no subset for the clients in default.
    let private = moved.replace(
        "  host: istio-egressgateway\n",
        "  host: istio-egressgateway\n  exportTo: [\".\"]\n",
    );
    let d = routed(&private);
    let via = &d.scopes["default"].redirects[&key(80, WIKI_IP)].via;
    assert!(
        matches!(via, Via::Refused(w) if w.contains("subset wikipedia")),
        "{via:?}"
    );
}

#[test]
fn an_entrys_own_addresses_are_routed_like_its_answers() {
    let entry = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: fixed, namespace: default}
spec:
  hosts: [fixed.example.com]
  addresses: [198.51.100.77, 198.51.100.0/28]
  resolution: STATIC
  endpoints: [{address: 198.51.100.77}]
  ports: [{number: 80, name: http, protocol: HTTP}]
"#;
    let vs = STEP5.replace("www.wikipedia.org", "fixed.example.com");
    let d = compile_with(
        &format!("{entry}---{SERVICE}---{vs}"),
        OutboundMode::RegistryOnly,
        false,
    );
    let redirects = &d.scopes["default"].redirects;
    assert!(redirects.contains_key(&key(80, "198.51.100.77")));
    assert_eq!(
        redirects.len(),
        1,
        "a CIDR is not redirected: {redirects:?}"
    );
}

#[test]
fn decide_replays_the_redirect_and_the_refusal() {
    use crate::policy::decide::decide;
    let d = seed();
    let to = decide(&d, "default", ip(WIKI_IP), 80, L4::Tcp);
    assert!(to.allowed);
    assert!(
        to.describe()
            .contains("redirected to egress gateway istio-system/istio-egressgateway"),
        "{}",
        to.describe()
    );
    // UDP to the same port is not routed, and no entry allows it.
    assert!(!decide(&d, "default", ip(WIKI_IP), 80, L4::Udp).allowed);
    let strict = compile_with(
        &format!("{ENTRY}---{SERVICE}---{STEP5}"),
        OutboundMode::AllowAny,
        true,
    );
    let other = decide(&strict, "default", ip(WIKI_IP), 8443, L4::Udp);
    assert!(!other.allowed, "{}", other.describe());
    assert!(
        other.describe().contains("--egress-gateway-only"),
        "{}",
        other.describe()
    );
}

#[test]
fn a_tenants_virtual_service_redirects_only_its_own_namespace() {
    // The tenant routes www.wikipedia.org, for everyone (no exportTo), to its own pod.
    let tenant = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: trap, namespace: tenant}
spec:
  hosts: [trap.tenant.svc.cluster.local]
  exportTo: ["*"]
  resolution: STATIC
  endpoints: [{address: 198.51.100.66}]
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: trap, namespace: tenant}
spec:
  selector: {app: trap}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [www.wikipedia.org]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: trap, namespace: tenant}
spec:
  hosts: [www.wikipedia.org]
  gateways: [trap, mesh]
  http:
  - match: [{gateways: [mesh], port: 80}]
    route: [{destination: {host: trap.tenant.svc.cluster.local, port: {number: 80}}}]
"#;
    let yaml = format!("{ENTRY}---{SERVICE}---{tenant}");
    let d = compile_with(&yaml, OutboundMode::RegistryOnly, false);
    assert!(
        d.scopes["default"].redirects.is_empty(),
        "{:?}",
        d.scopes["default"].redirects
    );
    assert!(
        d.notes
            .iter()
            .any(|n| n.contains("VirtualService tenant/trap")),
        "{:?}",
        d.notes
    );
    // Istio's default, on request: every namespace it is exported to.
    let any = compile_inputs(
        &yaml,
        OutboundMode::RegistryOnly,
        StatusInputs {
            gateway_any_namespace: true,
            ..StatusInputs::default()
        },
    );
    assert!(any.scopes["default"]
        .redirects
        .contains_key(&key(80, WIKI_IP)));
    // From the root namespace, a route applies everywhere it is exported.
    let root = yaml.replace("namespace: tenant", "namespace: istio-system");
    let root = root.replace("trap.tenant.svc", "trap.istio-system.svc");
    let d = compile_with(&root, OutboundMode::RegistryOnly, false);
    assert!(d.scopes["default"]
        .redirects
        .contains_key(&key(80, WIKI_IP)));
}
