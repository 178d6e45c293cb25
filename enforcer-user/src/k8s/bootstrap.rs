//! What every pod needs before its policy is known (its cgroup is not mapped yet, or the agent
//! is down): the API server and the cluster DNS. Without these, a pinned REGISTRY_ONLY
//! `enforcer.unmapped` scope would refuse a new agent pod the API server, and the node would
//! never recover.

use std::{
    borrow::Borrow,
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::api::core::v1::Service;

use super::slice::EndpointSlice;

use crate::policy::{Rule, L4};

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The API server as `api` (this agent's client config) names it, the `default/kubernetes`
/// Service with its endpoints, and the `kube-system/kube-dns` Service on port 53. Only cluster
/// administrators can write those objects, so they open nothing a tenant chose.
pub fn rules(
    services: &[impl Borrow<Service>],
    slices: &[impl Borrow<EndpointSlice>],
    api: &[SocketAddr],
) -> Vec<Rule> {
    let mut rules: Vec<Rule> = api
        .iter()
        .map(|a| Rule::host(L4::Tcp, a.port(), a.ip()))
        .collect();
    for svc in services.iter().map(Borrow::borrow) {
        let meta = &svc.metadata;
        match (meta.namespace.as_deref(), meta.name.as_deref()) {
            (Some("default"), Some("kubernetes")) => {
                for ip in cluster_ips(svc) {
                    rules.extend(tcp_ports(svc).map(|port| Rule::host(L4::Tcp, port, ip)));
                }
            }
            (Some("kube-system"), Some("kube-dns")) => {
                for ip in cluster_ips(svc) {
                    rules.extend([L4::Udp, L4::Tcp].map(|l4| Rule::host(l4, 53, ip)));
                }
            }
            _ => {}
        }
    }
    for slice in slices.iter().map(Borrow::borrow) {
        let meta = &slice.metadata;
        let service = meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL));
        if meta.namespace.as_deref() != Some("default")
            || service.map(String::as_str) != Some("kubernetes")
        {
            continue;
        }
        let ports: Vec<u16> = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| u16::try_from(p.port?).ok())
            .collect();
        for ip in slice
            .endpoints
            .iter()
            .flat_map(|e| &e.addresses)
            .filter_map(|a| a.parse::<IpAddr>().ok())
        {
            rules.extend(ports.iter().map(|&port| Rule::host(L4::Tcp, port, ip)));
        }
    }
    rules.sort();
    rules.dedup();
    rules
}

fn cluster_ips(svc: &Service) -> impl Iterator<Item = IpAddr> + '_ {
    let spec = svc.spec.as_ref();
    spec.and_then(|s| s.cluster_ips.as_ref())
        .into_iter()
        .flatten()
        .chain(spec.and_then(|s| s.cluster_ip.as_ref()))
        .filter_map(|ip| ip.parse().ok())
}

fn tcp_ports(svc: &Service) -> impl Iterator<Item = u16> + '_ {
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| u16::try_from(p.port).ok())
}

/// The API server's addresses from the client config's host; a name is resolved once, at
/// start (in-cluster configs give an address).
pub fn endpoints_of(host: &str, port: u16) -> Vec<SocketAddr> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Vec::new();
    }
    match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
            .map(Iterator::collect)
            .unwrap_or_else(|err| {
                log::warn!("resolving the API server {host}: {err}; unmapped pods cannot reach it");
                Vec::new()
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
        serde_yaml::from_str(yaml).expect("object")
    }

    #[test]
    fn the_api_server_and_cluster_dns_and_nothing_a_tenant_wrote() {
        let services: Vec<Service> = [
            "metadata: {name: kubernetes, namespace: default}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 443, protocol: TCP}]}",
            "metadata: {name: kube-dns, namespace: kube-system}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 53, protocol: UDP}]}",
            "metadata: {name: kubernetes, namespace: shop}\nspec: {clusterIP: 10.96.7.7, ports: [{port: 443}]}",
        ]
        .iter()
        .map(|y| parse(y))
        .collect();
        let slices: Vec<EndpointSlice> = [
            "metadata: {name: kubernetes, namespace: default, labels: {kubernetes.io/service-name: kubernetes}}\naddressType: IPv4\nendpoints: [{addresses: [172.18.0.2]}]\nports: [{port: 6443, protocol: TCP}]",
            "metadata: {name: evil, namespace: shop, labels: {kubernetes.io/service-name: kubernetes}}\naddressType: IPv4\nendpoints: [{addresses: [198.51.100.99]}]\nports: [{port: 443}]",
        ]
        .iter()
        .map(|y| parse(y))
        .collect();
        let api = endpoints_of("[2001:db8::6]", 6443);
        let got: Vec<String> = rules(&services, &slices, &api)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            got,
            [
                "10.96.0.10:53/tcp",
                "10.96.0.1:443/tcp",
                "172.18.0.2:6443/tcp",
                "[2001:db8::6]:6443/tcp",
                "10.96.0.10:53/udp",
            ]
        );
        assert!(endpoints_of("", 443).is_empty());
    }
}
