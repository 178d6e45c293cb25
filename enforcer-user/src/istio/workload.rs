//! WorkloadEntry and Sidecar: the objects that add endpoints to a ServiceEntry and override a
//! namespace's or a workload's outbound policy.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::mesh::OutboundTrafficPolicy;

/// `spec` of a WorkloadEntry (the same shape as a ServiceEntry endpoint).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntrySpec {
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub service_account: Option<String>,
}

/// `spec` of a Sidecar, the parts that decide egress.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub egress: Vec<EgressListener>,
    #[serde(default)]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    /// Not enforced here; read so that an ingress-only Sidecar is not taken for an empty one.
    #[serde(default)]
    pub ingress: Vec<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressListener {
    #[serde(default)]
    pub hosts: Vec<String>,
    /// A listener with a port imports its hosts on that port only.
    #[serde(default)]
    pub port: Option<super::Port>,
    #[serde(default)]
    pub bind: Option<String>,
}

/// What an object was declared as.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeclaredAs {
    /// The Istio object itself.
    #[default]
    Istio,
    /// A Kubernetes Service, as the ServiceEntry Istio derives from it. Istio keeps a Service
    /// and a ServiceEntry of one name apart, and gives them different default visibility.
    Service,
}

/// A namespaced object with where it came from, for errors.
#[derive(Debug, Clone)]
pub struct Object<T> {
    pub namespace: String,
    pub name: String,
    pub spec: T,
    pub origin: String,
    /// Set by the parser, never from the document: only the registry of Services makes
    /// [`DeclaredAs::Service`].
    pub declared_as: DeclaredAs,
    /// `metadata.creationTimestamp` (RFC 3339, so it sorts as text). Istio lets the oldest of
    /// two conflicting objects win; local files usually have none and then the name decides.
    pub created: Option<String>,
}

impl<T> Object<T> {
    /// `namespace/name`, with ` (Service)` after an entry derived from a Service: it is not
    /// the ServiceEntry of that name, so neither replaces nor duplicates it. The namespace stays
    /// first, where explanations read it.
    pub fn id(&self) -> String {
        match self.declared_as {
            DeclaredAs::Istio => format!("{}/{}", self.namespace, self.name),
            DeclaredAs::Service => format!("{}/{} (Service)", self.namespace, self.name),
        }
    }

    /// Istio's precedence among conflicting objects: oldest first, then by name.
    pub fn age_key(&self) -> (bool, &str, &str, &str) {
        (
            self.created.is_none(),
            self.created.as_deref().unwrap_or_default(),
            &self.namespace,
            &self.name,
        )
    }
}

pub type WorkloadEntry = Object<WorkloadEntrySpec>;
pub type Sidecar = Object<SidecarSpec>;
