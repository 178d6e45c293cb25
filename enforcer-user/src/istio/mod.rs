//! The Istio objects `enforcer` reads, as serde types. Unknown fields are ignored, as the API
//! server would keep them; the fields that matter are checked by `policy::validate`.

mod mesh;
mod service_entry;

pub use mesh::{MeshConfig, OutboundMode};
pub use service_entry::{Endpoint, Port, Resolution, ServiceEntrySpec};

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// A ServiceEntry with the metadata and the origin it was read from.
#[derive(Debug, Clone)]
pub struct ServiceEntry {
    pub namespace: String,
    pub name: String,
    pub spec: ServiceEntrySpec,
    /// Where it came from, for error messages: a file path, or `kubernetes`.
    pub origin: String,
}

impl ServiceEntry {
    /// `namespace/name`, as istioctl prints it.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Namespace of an object that does not name one, as `kubectl apply` would use.
pub const DEFAULT_NAMESPACE: &str = "default";

/// API versions under which `networking.istio.io` objects are accepted.
pub const NETWORKING_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];
