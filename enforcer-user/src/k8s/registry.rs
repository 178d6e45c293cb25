//! The in-cluster registry: Kubernetes Services (with their EndpointSlices) as the ServiceEntries
//! Istio would derive from them, so that REGISTRY_ONLY namespaces keep reaching in-cluster
//! services. They go through the same parsing and validation as user ServiceEntries.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet},
};

use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use serde_json::{json, Value};

use super::slice::EndpointSlice;
use crate::sources::{documents, Snapshot};

/// Istio's annotation that narrows where a Service is visible.
pub const EXPORT_TO: &str = "networking.istio.io/exportTo";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Who manages an EndpointSlice; only the endpoint controller's are the Service's endpoints.
const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
const ENDPOINT_CONTROLLER: &str = "endpointslice-controller.k8s.io";

/// Adds every Service to `snap` as the ServiceEntry Istio derives from it, marked as a Service
/// (so a ServiceEntry of the same name is another object, as in Istio).
pub fn add_to(
    snap: &mut Snapshot,
    services: &[impl Borrow<Service>],
    slices: &[impl Borrow<EndpointSlice>],
    cluster_domain: &str,
    socket_lb: bool,
) {
    for_each_entry(services, slices, cluster_domain, socket_lb, |entry| {
        let label = format!(
            "Service {}/{}",
            entry["metadata"]["namespace"].as_str().unwrap_or_default(),
            entry["metadata"]["name"].as_str().unwrap_or_default()
        );
        let origin = format!("{} {label}", super::ORIGIN);
        match serde_yaml::to_value(&entry) {
            Ok(yaml) => documents::parse_service(&origin, &label, yaml, snap),
            Err(err) => log::error!("{origin}: cannot be read: {err}"),
        }
    });
}

/// One ServiceEntry document per Service:
/// - ClusterIP (and NodePort, LoadBalancer) services: the cluster IPs on the service ports, as
///   Istio allows them. With `socket_lb` also their endpoints on the endpoints' ports: a CNI
///   that translates at connect time (Cilium's socket LB) shows the hooks the endpoint, not
///   the cluster IP;
/// - headless services: the endpoint addresses on their ports (they have no cluster IP);
/// - ExternalName services: the external name, resolved over DNS, on the service ports. That
///   is exactly a DNS ServiceEntry for that name, which whoever may create Services can write.
///
/// Endpoints come only from the EndpointSlices the endpoint controller manages: anyone who may
/// create an EndpointSlice can label it with a Service's name, and would otherwise open any
/// address (such as 169.254.169.254) to the Service's namespace.
pub fn service_entries(
    services: &[impl Borrow<Service>],
    slices: &[impl Borrow<EndpointSlice>],
    cluster_domain: &str,
    socket_lb: bool,
) -> Vec<Value> {
    let mut out = Vec::new();
    for_each_entry(services, slices, cluster_domain, socket_lb, |e| out.push(e));
    out
}

/// As [`service_entries`], one at a time: 10,000 Services' documents never exist at once.
fn for_each_entry(
    services: &[impl Borrow<Service>],
    slices: &[impl Borrow<EndpointSlice>],
    cluster_domain: &str,
    socket_lb: bool,
    mut each: impl FnMut(Value),
) {
    let mut by_service: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices.iter().map(Borrow::borrow) {
        let labels = slice.metadata.labels.as_ref();
        let managed = labels
            .and_then(|l| l.get(MANAGED_BY_LABEL))
            .map(String::as_str);
        if managed != Some(ENDPOINT_CONTROLLER) {
            continue;
        }
        if let Some(name) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) {
            let ns = slice.metadata.namespace.as_deref().unwrap_or_default();
            by_service.entry((ns, name)).or_default().push(slice);
        }
    }
    for svc in services.iter().map(Borrow::borrow) {
        let meta = &svc.metadata;
        let (Some(ns), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref()) else {
            continue;
        };
        let slices = by_service.get(&(ns, name)).map_or(&[][..], Vec::as_slice);
        each(entry_for(svc, ns, name, slices, cluster_domain, socket_lb));
    }
}

fn entry_for(
    svc: &Service,
    ns: &str,
    name: &str,
    slices: &[&EndpointSlice],
    cluster_domain: &str,
    socket_lb: bool,
) -> Value {
    let spec = svc.spec.clone().unwrap_or_default();
    let (mut ports, port_names) = service_ports(&spec);
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let external = spec.type_.as_deref() == Some("ExternalName");
    let (resolution, endpoints) = match spec.external_name.as_deref() {
        // Exactly what a DNS ServiceEntry for that name allows.
        Some(name) if external => ("DNS", vec![json!({"address": name.trim_end_matches('.')})]),
        _ if !external && (headless || socket_lb) => {
            let (endpoints, shared) = endpoints(slices, &port_names);
            // One mapping for every endpoint is the ports' targetPort: a map per endpoint
            // would cost every node memory for each of the cluster's endpoints.
            for port in &mut ports {
                if let Some(target) = shared.get(port["name"].as_str().unwrap_or_default()) {
                    port["targetPort"] = target.clone();
                }
            }
            ("STATIC", endpoints)
        }
        _ => ("STATIC", Vec::new()),
    };
    let mut entry = json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "hosts": [format!("{name}.{ns}.svc.{cluster_domain}")],
            "addresses": cluster_ips(&spec),
            "ports": ports,
            "location": "MESH_INTERNAL",
            "resolution": resolution,
            "endpoints": endpoints,
        }
    });
    if let Some(export) = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(EXPORT_TO))
    {
        let list: Vec<&str> = export
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        entry["spec"]["exportTo"] = json!(list);
    }
    entry
}

/// The entry's ports, and Service port name -> our port name (unnamed ports are only allowed
/// alone, so the empty name is unique too).
fn service_ports(spec: &ServiceSpec) -> (Vec<Value>, BTreeMap<String, String>) {
    let mut ports = Vec::new();
    let mut names = BTreeMap::new();
    for port in spec.ports.iter().flatten() {
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        if !matches!(protocol, "TCP" | "UDP") {
            continue; // SCTP: not enforced by these programs.
        }
        let ours = format!("{}-{}", protocol.to_ascii_lowercase(), port.port);
        names.insert(port.name.clone().unwrap_or_default(), ours.clone());
        ports.push(json!({"number": port.port, "protocol": protocol, "name": ours}));
    }
    (ports, names)
}

/// Every cluster IP, once (`clusterIP` repeats the first of `clusterIPs`).
fn cluster_ips(spec: &ServiceSpec) -> Vec<&str> {
    spec.cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .map(String::as_str)
        .filter(|ip| !ip.is_empty() && *ip != "None")
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The slices' endpoint addresses with the slices' ports under our port names. When every
/// slice maps the ports alike (the usual case), the endpoints carry no ports and the mapping
/// is returned, for the entry's `targetPort`s; otherwise each endpoint carries its slice's.
fn endpoints(
    slices: &[&EndpointSlice],
    port_names: &BTreeMap<String, String>,
) -> (Vec<Value>, serde_json::Map<String, Value>) {
    let mappings: Vec<serde_json::Map<String, Value>> = slices
        .iter()
        .map(|slice| {
            let mut ports = serde_json::Map::new();
            for p in slice.ports.iter().flatten() {
                let key = p.name.clone().unwrap_or_default();
                if let (Some(ours), Some(number)) = (port_names.get(&key), p.port) {
                    ports.insert(ours.clone(), json!(number));
                }
            }
            ports
        })
        .collect();
    let shared = mappings.windows(2).all(|w| w[0] == w[1]);
    let mut out = Vec::new();
    for (slice, ports) in slices.iter().zip(&mappings) {
        for address in slice.endpoints.iter().flat_map(|ep| &ep.addresses) {
            out.push(if shared {
                json!({"address": address})
            } else {
                json!({"address": address, "ports": ports})
            });
        }
    }
    let common = match (shared, mappings.into_iter().next()) {
        (true, Some(ports)) => ports,
        _ => serde_json::Map::new(),
    };
    (out, common)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).expect("service")
    }

    fn slice(yaml: &str) -> EndpointSlice {
        serde_yaml::from_str(yaml).expect("slice")
    }

    #[test]
    fn cluster_ip_service_with_endpoints_and_export_to() {
        let services = [svc(r#"
metadata:
  name: api
  namespace: shop
  annotations: {networking.istio.io/exportTo: ". , billing"}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, fd00::10]
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP}
  - {name: sctp, port: 9, protocol: SCTP}
"#)];
        let slices = [
            slice(
                r#"
metadata:
  name: api-x1
  namespace: shop
  labels:
    kubernetes.io/service-name: api
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
addressType: IPv4
endpoints:
- addresses: [10.244.1.5]
- addresses: [10.244.2.7]
ports:
- {name: http, port: 8080}
- {name: dns, port: 5353, protocol: UDP}
"#,
            ),
            slice(
                r#"
metadata:
  name: other
  namespace: shop
  labels:
    kubernetes.io/service-name: other
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
addressType: IPv4
endpoints:
- addresses: [10.244.9.9]
"#,
            ),
        ];
        let out = service_entries(&services, &slices, "cluster.local", true);
        assert_eq!(out.len(), 1);
        let spec = &out[0]["spec"];
        assert_eq!(spec["hosts"], json!(["api.shop.svc.cluster.local"]));
        assert_eq!(spec["addresses"], json!(["10.96.0.10", "fd00::10"]));
        assert_eq!(spec["exportTo"], json!([".", "billing"]));
        assert_eq!(
            spec["ports"],
            json!([
                {"number": 80, "protocol": "TCP", "name": "tcp-80", "targetPort": 8080},
                {"number": 53, "protocol": "UDP", "name": "udp-53", "targetPort": 5353}
            ]),
            "SCTP is left out; the slices' one port mapping is the targetPort"
        );
        assert_eq!(
            spec["endpoints"],
            json!([{"address": "10.244.1.5"}, {"address": "10.244.2.7"}]),
            "with --socket-lb, only this service's slices"
        );
        let out = service_entries(&services, &slices, "cluster.local", false);
        assert_eq!(
            out[0]["spec"]["endpoints"],
            json!([]),
            "without a socket LB connect() names the cluster IP, as Istio allows it"
        );
        assert_eq!(
            out[0]["spec"]["addresses"],
            json!(["10.96.0.10", "fd00::10"])
        );
    }

    #[test]
    fn only_the_endpoint_controllers_slices_give_endpoints() {
        let services = [
            svc("metadata: {name: db, namespace: a}\nspec: {clusterIP: None, ports: [{port: 5432}]}"),
            svc("metadata: {name: web, namespace: a}\nspec: {clusterIP: 10.96.0.20, ports: [{port: 443}]}"),
        ];
        // Anyone who may create EndpointSlices can label one with a service's name.
        let forged = |service: &str, managed_by: &str| {
            slice(&format!(
                "metadata: {{name: {service}-evil, namespace: a, labels: {{kubernetes.io/service-name: {service}{managed_by}}}}}\naddressType: IPv4\nendpoints: [{{addresses: [198.51.100.99]}}]\nports: [{{port: 443}}]"
            ))
        };
        let slices = [
            forged("db", ""),
            forged("web", ""),
            forged(
                "db",
                ", endpointslice.kubernetes.io/managed-by: my-controller",
            ),
            forged(
                "web",
                ", endpointslice.kubernetes.io/managed-by: my-controller",
            ),
        ];
        for socket_lb in [false, true] {
            for entry in service_entries(&services, &slices, "cluster.local", socket_lb) {
                assert_eq!(entry["spec"]["endpoints"], json!([]), "{entry}");
            }
        }
    }

    #[test]
    fn a_service_and_a_service_entry_of_one_name_both_stay() {
        let services = [svc(
            "metadata: {name: api, namespace: shop}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}",
        )];
        let mut snap = documents::parse_documents(
            "f.yaml",
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api, namespace: shop}\nspec: {hosts: [api.example.com], ports: [{number: 443, name: tls, protocol: TLS}], resolution: DNS}\n",
        );
        add_to(
            &mut snap,
            &services,
            &[] as &[EndpointSlice],
            "cluster.local",
            false,
        );
        let checked = crate::policy::check::check(snap);
        assert!(checked.problems.is_empty(), "{:?}", checked.problems);
        let ids: Vec<String> = checked.service_entries.iter().map(|se| se.id()).collect();
        assert_eq!(ids, ["shop/api", "shop/api (Service)"]);
    }

    #[test]
    fn headless_unnamed_port_and_external_name() {
        let services = [
            svc("metadata: {name: db, namespace: a}\nspec: {clusterIP: None, ports: [{port: 5432}]}"),
            svc("metadata: {name: ext, namespace: a}\nspec: {type: ExternalName, externalName: db.example.com., ports: [{port: 443}]}"),
        ];
        let slices = [slice(
            "metadata: {name: db-1, namespace: a, labels: {kubernetes.io/service-name: db, endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.4]}]\nports: [{port: 5432}]",
        )];
        // Headless services have no cluster IP: their endpoints are what connect() names.
        let out = service_entries(&services, &slices, "example.internal", false);
        let db = &out[0]["spec"];
        assert_eq!(db["addresses"], json!([]));
        assert_eq!(db["endpoints"], json!([{"address": "10.0.0.4"}]));
        assert_eq!(db["ports"][0]["targetPort"], 5432);
        assert_eq!(db["hosts"], json!(["db.a.svc.example.internal"]));
        let ext = &out[1]["spec"];
        assert_eq!(ext["resolution"], "DNS");
        assert_eq!(ext["endpoints"], json!([{"address": "db.example.com"}]));
        assert!(ext.get("exportTo").is_none());
    }

    /// Slices of one Service that map its port differently (a rollout that changed the
    /// targetPort): each endpoint keeps its own slice's port.
    #[test]
    fn slices_that_disagree_keep_a_port_per_endpoint() {
        let services =
            [svc("metadata: {name: db, namespace: a}\nspec: {clusterIP: None, ports: [{name: pg, port: 5432}]}")];
        let slice_with = |name: &str, addr: &str, port: u16| {
            slice(&format!(
                "metadata: {{name: {name}, namespace: a, labels: {{kubernetes.io/service-name: db, endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io}}}}\naddressType: IPv4\nendpoints: [{{addresses: [{addr}]}}]\nports: [{{name: pg, port: {port}}}]"
            ))
        };
        let slices = [
            slice_with("db-old", "10.0.0.4", 5432),
            slice_with("db-new", "10.0.0.5", 6432),
        ];
        let out = service_entries(&services, &slices, "cluster.local", false);
        let spec = &out[0]["spec"];
        assert!(spec["ports"][0].get("targetPort").is_none());
        assert_eq!(
            spec["endpoints"],
            json!([
                {"address": "10.0.0.4", "ports": {"tcp-5432": 5432}},
                {"address": "10.0.0.5", "ports": {"tcp-5432": 6432}}
            ])
        );
    }
}
