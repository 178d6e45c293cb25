//! Gateway, VirtualService and DestinationRule: the objects that route mesh traffic through an
//! egress gateway. Only the fields that decide where a connection goes are typed; the rest of a
//! route (L7 predicates, retries, rewrites) is kept as raw values, so that validation can say
//! what is ignored and the analyzer can say when it would split traffic.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_yaml::Value;

use super::{Object, Port};

/// Fields an object carries that its type does not name, by name.
pub type Other = BTreeMap<String, Value>;

/// `spec` of a Gateway.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Labels of the proxy workloads this Gateway configures, searched in every namespace.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub servers: Vec<Server>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Server {
    #[serde(default)]
    pub port: Option<Port>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub tls: Option<ServerTls>,
    #[serde(default)]
    pub bind: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub default_endpoint: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerTls {
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub https_redirect: Option<bool>,
    #[serde(default)]
    pub credential_name: Option<String>,
    #[serde(default)]
    pub server_certificate: Option<String>,
    #[serde(default)]
    pub private_key: Option<String>,
    #[serde(default)]
    pub ca_certificates: Option<String>,
}

/// `spec` of a VirtualService.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    /// `mesh`, `<namespace>/<name>` or a name in the VirtualService's namespace. Empty means
    /// `[mesh]`.
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    #[serde(default)]
    pub tls: Vec<TlsRoute>,
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    #[serde(default)]
    pub export_to: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatch>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
    #[serde(default)]
    pub redirect: Option<Value>,
    #[serde(default)]
    pub direct_response: Option<Value>,
    #[serde(default)]
    pub delegate: Option<Value>,
    /// Everything else: retries, rewrites, timeouts, and fields that do not exist (the seed's
    /// `port` beside `match`).
    #[serde(flatten)]
    pub other: Other,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub port: Option<u32>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub source_namespace: Option<String>,
    /// uri, headers, method, authority, scheme, queryParams...: decided per request, which a
    /// connection-level redirect cannot do.
    #[serde(flatten)]
    pub l7: Other,
}

/// A `tls` or `tcp` route: its matches and where it sends what they take.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", bound = "M: Deserialize<'de>")]
pub struct L4Route<M> {
    #[serde(default = "Vec::new", rename = "match")]
    pub matches: Vec<M>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

pub type TlsRoute = L4Route<TlsMatch>;
pub type TcpRoute = L4Route<L4Match>;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsMatch {
    #[serde(default)]
    pub sni_hosts: Vec<String>,
    /// The rest is a TCP match's.
    #[serde(flatten)]
    pub l4: L4Match,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct L4Match {
    #[serde(default)]
    pub destination_subnets: Vec<String>,
    #[serde(default)]
    pub port: Option<u32>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub source_namespace: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteDestination {
    #[serde(default)]
    pub destination: Option<Destination>,
    #[serde(default)]
    pub weight: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub subset: Option<String>,
    #[serde(default)]
    pub port: Option<PortSelector>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct PortSelector {
    #[serde(default)]
    pub number: u32,
}

/// `spec` of a DestinationRule.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    #[serde(default)]
    pub export_to: Option<Vec<String>>,
    #[serde(default)]
    pub workload_selector: Option<MatchLabels>,
}

/// `istio.type.v1beta1.WorkloadSelector`: unlike a Sidecar's, its labels are `matchLabels`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MatchLabels {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    #[serde(default)]
    pub tls: Option<ClientTls>,
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
    /// connectionPool, loadBalancer, outlierDetection...: kept so that an empty policy, which
    /// Istio rejects, can be told from one with only untyped fields.
    #[serde(flatten)]
    pub other: Other,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    #[serde(default)]
    pub port: Option<PortSelector>,
    #[serde(default)]
    pub tls: Option<ClientTls>,
    #[serde(flatten)]
    pub other: Other,
}

/// What the client side of a connection sends: `DISABLE`, `SIMPLE`, `MUTUAL` or
/// `ISTIO_MUTUAL`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientTls {
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub sni: Option<String>,
    /// With it, certificates come from a secret and the file fields must stay empty.
    #[serde(default)]
    pub credential_name: Option<String>,
    #[serde(default)]
    pub client_certificate: Option<String>,
    #[serde(default)]
    pub private_key: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

pub type Gateway = Object<GatewaySpec>;
pub type VirtualService = Object<VirtualServiceSpec>;
pub type DestinationRule = Object<DestinationRuleSpec>;

/// The reserved gateway name of every sidecar (here: every enforced workload).
pub const MESH_GATEWAY: &str = "mesh";

impl VirtualServiceSpec {
    /// The gateways the VirtualService applies to: `[mesh]` when it names none.
    pub fn effective_gateways(&self) -> Vec<&str> {
        if self.gateways.is_empty() {
            vec![MESH_GATEWAY]
        } else {
            self.gateways.iter().map(String::as_str).collect()
        }
    }
}

/// A gateway reference as `namespace/name` (`mesh` stays `mesh`): a short name is in the
/// referring object's namespace. Istio's legacy `name.namespace.svc.cluster.local` form is
/// read too.
pub fn resolve_gateway_name(reference: &str, namespace: &str) -> String {
    if reference == MESH_GATEWAY {
        return reference.to_string();
    }
    if let Some((ns, name)) = reference.split_once('/') {
        return format!("{ns}/{name}");
    }
    let mut parts = reference.split('.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(name), Some(ns), Some(_)) if reference.contains(".svc.") => format!("{ns}/{name}"),
        _ => format!("{namespace}/{reference}"),
    }
}

impl TrafficPolicy {
    /// The client TLS mode for `port`: the port's own setting, else the policy's.
    pub fn tls_mode_for(&self, port: u32) -> Option<&str> {
        self.port_level_settings
            .iter()
            .find(|p| p.port.is_some_and(|s| s.number == port))
            .and_then(|p| p.tls.as_ref())
            .or(self.tls.as_ref())
            .and_then(|t| t.mode.as_deref())
    }
}

/// Istio's `host.Name.Matches`: the names overlap, a wildcard on either side covering the other
/// (`*.com` and `foo.com`, `*` and anything; `*.foo.com` never covers `foo.com`).
pub fn host_matches(a: &str, b: &str) -> bool {
    match (a.strip_prefix('*'), b.strip_prefix('*')) {
        (Some(x), Some(y)) if x.len() < y.len() => y.ends_with(x),
        (Some(x), Some(y)) => x.ends_with(y),
        (Some(x), None) => b.ends_with(x),
        (None, Some(y)) => a.ends_with(y),
        (None, None) => a == b,
    }
}

/// Istio's `host.Name.SubsetOf`: every name `n` covers is covered by `o`.
pub fn host_subset_of(n: &str, o: &str) -> bool {
    match (n.strip_prefix('*'), o.strip_prefix('*')) {
        (Some(x), Some(y)) => x.len() >= y.len() && x.ends_with(y),
        (Some(_), None) => false,
        (None, Some(y)) => n.ends_with(y),
        (None, None) => n == o,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_match_as_istio_does() {
        assert!(host_matches("*.com", "foo.com") && host_matches("bar.com", "*.com"));
        assert!(host_matches("*", "*.com") && !host_matches("*.foo.com", "foo.com"));
        assert!(
            host_subset_of("a.foo.com", "*.foo.com") && host_subset_of("*.a.foo.com", "*.foo.com")
        );
        assert!(!host_subset_of("*.foo.com", "a.foo.com") && !host_subset_of("*.com", "*.foo.com"));
    }

    #[test]
    fn gateway_names_resolve_as_istio_does() {
        assert_eq!(resolve_gateway_name("mesh", "default"), "mesh");
        assert_eq!(resolve_gateway_name("egw", "default"), "default/egw");
        assert_eq!(
            resolve_gateway_name("istio-system/istio-egressgateway", "default"),
            "istio-system/istio-egressgateway"
        );
        assert_eq!(
            resolve_gateway_name("egw.istio-system.svc.cluster.local", "default"),
            "istio-system/egw"
        );
    }
}
