//! The policy compiler: Istio objects and DNS answers in, desired rules per namespace out.
//!
//! Everything here is pure (no I/O), so the semantics are unit-tested without a kernel.

pub mod analyze;
mod analyze_routing;
pub mod check;
mod compile;
pub mod decide;
pub mod gateway;
mod learn;
mod mesh_settings;
mod model;
mod route_view;
pub mod sidecar;
mod validate;
mod validate_route;
mod validate_routing;
mod validate_server;
mod validate_workload;

pub use compile::{compile, dns_names, endpoint_names, Inputs};
pub use gateway::{routing_names, Routing};
pub use mesh_settings::MeshSettings;
pub use model::{
    canonical_ip, canonical_net, scope_name, Desired, GatewayRoute, HostRef, Origin, RedirectKey,
    Rule, ScopePolicy, Via, L4,
};
pub use validate::{export_to_errors, is_dns1123_label, validate_service_entry};
pub use validate_routing::{validate_destination_rule, validate_gateway, validate_virtual_service};
pub use validate_workload::{
    is_label_key, is_label_value, validate_sidecar, validate_workload_entry,
};

/// The transport an Istio port protocol rides on; `None` for an unknown protocol.
pub fn l4_of_protocol(protocol: Option<&str>) -> Option<L4> {
    let p = protocol.unwrap_or_default().to_ascii_uppercase();
    match p.as_str() {
        "" | "HTTP" | "HTTPS" | "HTTP2" | "HTTP_PROXY" | "GRPC" | "GRPC-WEB" | "TLS" | "TCP"
        | "MONGO" | "MYSQL" | "REDIS" => Some(L4::Tcp),
        "UDP" => Some(L4::Udp),
        _ => None,
    }
}

/// Protocols Istio treats as opaque TCP, where it routes by destination address alone.
pub fn is_opaque_tcp(protocol: Option<&str>) -> bool {
    matches!(
        protocol.unwrap_or_default().to_ascii_uppercase().as_str(),
        "" | "TCP" | "MONGO" | "MYSQL" | "REDIS"
    )
}
