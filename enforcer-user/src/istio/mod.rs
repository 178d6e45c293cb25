//! The Istio objects `enforcer` reads, as serde types. Unknown fields are ignored, as the API
//! server would keep them; the fields that matter are checked by `policy::validate`.

mod mesh;
pub mod routing;
mod service_entry;
mod workload;

pub use mesh::{MeshConfig, OutboundMode, OutboundTrafficPolicy};
pub use routing::{DestinationRule, Gateway, VirtualService};
pub use service_entry::{Endpoint, Port, Resolution, ServiceEntrySpec};
pub use workload::{
    DeclaredAs, EgressListener, Object, Sidecar, SidecarSpec, WorkloadEntry, WorkloadEntrySpec,
    WorkloadSelector,
};

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub creation_timestamp: Option<String>,
}

/// A ServiceEntry with the metadata and the origin it was read from.
pub type ServiceEntry = Object<ServiceEntrySpec>;

/// Namespace of an object that does not name one, as `kubectl apply` would use.
pub const DEFAULT_NAMESPACE: &str = "default";

/// API versions under which `networking.istio.io` objects are accepted.
pub const NETWORKING_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];
