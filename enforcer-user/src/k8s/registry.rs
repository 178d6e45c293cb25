//! The in-cluster registry: Kubernetes Services (with their EndpointSlices) as the ServiceEntries
//! Istio would derive from them, so that REGISTRY_ONLY namespaces keep reaching in-cluster
//! services. They go through the same parsing and validation as user ServiceEntries.

use std::{borrow::Borrow, collections::BTreeMap};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::{json, Value};

use crate::sources::{documents, Snapshot};

/// Istio's annotation that narrows where a Service is visible.
pub const EXPORT_TO: &str = "networking.istio.io/exportTo";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Adds every Service to `snap` as the ServiceEntry Istio derives from it, marked as a Service
/// (so a ServiceEntry of the same name is another object, as in Istio).
pub fn add_to(
    snap: &mut Snapshot,
    services: &[impl Borrow<Service>],
    slices: &[impl Borrow<EndpointSlice>],
    cluster_domain: &str,
) {
    for entry in service_entries(services, slices, cluster_domain) {
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
    }
}

/// One ServiceEntry document per Service:
/// - ClusterIP services: the cluster IPs on the service ports, plus every endpoint address on
///   its port (CNIs that translate at connect time, like Cilium's socket LB, show the hooks the
///   endpoint, not the cluster IP);
/// - headless services: the endpoint addresses on their ports;
/// - ExternalName services: the external name, resolved over DNS, on the service ports.
pub fn service_entries(
    services: &[impl Borrow<Service>],
    slices: &[impl Borrow<EndpointSlice>],
    cluster_domain: &str,
) -> Vec<Value> {
    let mut by_service: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices.iter().map(Borrow::borrow) {
        let ns = slice.metadata.namespace.as_deref().unwrap_or_default();
        if let Some(name) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        {
            by_service.entry((ns, name)).or_default().push(slice);
        }
    }
    services
        .iter()
        .map(Borrow::borrow)
        .filter_map(|svc: &Service| {
            let ns = svc.metadata.namespace.as_deref()?;
            let name = svc.metadata.name.as_deref()?;
            let slices = by_service.get(&(ns, name)).map_or(&[][..], Vec::as_slice);
            Some(entry_for(svc, ns, name, slices, cluster_domain))
        })
        .collect()
}

fn entry_for(
    svc: &Service,
    ns: &str,
    name: &str,
    slices: &[&EndpointSlice],
    cluster_domain: &str,
) -> Value {
    let spec = svc.spec.clone().unwrap_or_default();
    let mut ports = Vec::new();
    // Service port name -> our port name (unnamed ports are only allowed alone).
    let mut port_names = BTreeMap::new();
    for port in spec.ports.iter().flatten() {
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        if !matches!(protocol, "TCP" | "UDP") {
            continue; // SCTP: not enforced by these programs.
        }
        let ours = format!("{}-{}", protocol.to_ascii_lowercase(), port.port);
        port_names.insert(port.name.clone().unwrap_or_default(), ours.clone());
        ports.push(json!({"number": port.port, "protocol": protocol, "name": ours}));
    }
    let addresses: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .map(String::as_str)
        .filter(|ip| !ip.is_empty() && *ip != "None")
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut endpoints = Vec::new();
    let mut resolution = "STATIC";
    if spec.type_.as_deref() == Some("ExternalName") {
        if let Some(external) = &spec.external_name {
            resolution = "DNS";
            endpoints.push(json!({"address": external.trim_end_matches('.')}));
        }
    } else {
        for slice in slices {
            let mut ep_ports = serde_json::Map::new();
            for p in slice.ports.iter().flatten() {
                let key = p.name.clone().unwrap_or_default();
                if let (Some(ours), Some(number)) = (port_names.get(&key), p.port) {
                    ep_ports.insert(ours.clone(), json!(number));
                }
            }
            for ep in &slice.endpoints {
                for address in &ep.addresses {
                    endpoints.push(json!({"address": address, "ports": ep_ports}));
                }
            }
        }
    }
    let mut entry = json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "hosts": [format!("{name}.{ns}.svc.{cluster_domain}")],
            "addresses": addresses,
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
  labels: {kubernetes.io/service-name: api}
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
  labels: {kubernetes.io/service-name: other}
addressType: IPv4
endpoints:
- addresses: [10.244.9.9]
"#,
            ),
        ];
        let out = service_entries(&services, &slices, "cluster.local");
        assert_eq!(out.len(), 1);
        let spec = &out[0]["spec"];
        assert_eq!(spec["hosts"], json!(["api.shop.svc.cluster.local"]));
        assert_eq!(spec["addresses"], json!(["10.96.0.10", "fd00::10"]));
        assert_eq!(spec["exportTo"], json!([".", "billing"]));
        assert_eq!(
            spec["ports"],
            json!([
                {"number": 80, "protocol": "TCP", "name": "tcp-80"},
                {"number": 53, "protocol": "UDP", "name": "udp-53"}
            ]),
            "SCTP is left out"
        );
        assert_eq!(
            spec["endpoints"],
            json!([
                {"address": "10.244.1.5", "ports": {"tcp-80": 8080, "udp-53": 5353}},
                {"address": "10.244.2.7", "ports": {"tcp-80": 8080, "udp-53": 5353}}
            ]),
            "only this service's slices"
        );
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
            "metadata: {name: db-1, namespace: a, labels: {kubernetes.io/service-name: db}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.4]}]\nports: [{port: 5432}]",
        )];
        let out = service_entries(&services, &slices, "example.internal");
        let db = &out[0]["spec"];
        assert_eq!(db["addresses"], json!([]));
        assert_eq!(
            db["endpoints"],
            json!([{"address": "10.0.0.4", "ports": {"tcp-5432": 5432}}])
        );
        assert_eq!(db["hosts"], json!(["db.a.svc.example.internal"]));
        let ext = &out[1]["spec"];
        assert_eq!(ext["resolution"], "DNS");
        assert_eq!(ext["endpoints"], json!([{"address": "db.example.com"}]));
        assert!(ext.get("exportTo").is_none());
    }
}
