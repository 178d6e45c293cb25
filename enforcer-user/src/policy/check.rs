//! Validation of everything read at once: each object checked on its own, then identities.
//! The agent and `enforcer validate` share this, so both reject exactly the same objects.

use std::collections::BTreeMap;

use super::{
    validate_destination_rule, validate_gateway, validate_service_entry, validate_sidecar,
    validate_virtual_service, validate_workload_entry,
};
use crate::{
    diag::Problem,
    istio::{
        DestinationRule, Gateway, MeshConfig, Object, ServiceEntry, Sidecar, VirtualService,
        WorkloadEntry,
    },
    sources::Snapshot,
};

/// The valid objects, and every problem found (errors and warnings).
#[derive(Debug, Default)]
pub struct Checked {
    pub service_entries: Vec<ServiceEntry>,
    pub workload_entries: Vec<WorkloadEntry>,
    pub sidecars: Vec<Sidecar>,
    pub gateways: Vec<Gateway>,
    pub virtual_services: Vec<VirtualService>,
    pub destination_rules: Vec<DestinationRule>,
    pub mesh: Vec<(String, MeshConfig)>,
    pub problems: Vec<Problem>,
    /// A mesh config was found but could not be read: the caller must fail closed.
    pub mesh_unreadable: bool,
}

pub fn check(snap: Snapshot) -> Checked {
    let mut problems = snap.problems;
    let mesh_unreadable = snap.mesh.is_empty()
        && problems.iter().any(|p| {
            p.object == "MeshConfig"
                || p.field.starts_with("spec.meshConfig")
                || p.field.starts_with("data.mesh")
        });
    let service_entries = keep_valid(
        "ServiceEntry",
        snap.service_entries,
        validate_service_entry,
        &mut problems,
    );
    let workload_entries = keep_valid(
        "WorkloadEntry",
        snap.workload_entries,
        validate_workload_entry,
        &mut problems,
    );
    let sidecars = keep_valid("Sidecar", snap.sidecars, validate_sidecar, &mut problems);
    let gateways = keep_valid("Gateway", snap.gateways, validate_gateway, &mut problems);
    let virtual_services = keep_valid(
        "VirtualService",
        snap.virtual_services,
        validate_virtual_service,
        &mut problems,
    );
    let destination_rules = keep_valid(
        "DestinationRule",
        snap.destination_rules,
        validate_destination_rule,
        &mut problems,
    );
    Checked {
        service_entries,
        workload_entries,
        sidecars,
        gateways,
        virtual_services,
        destination_rules,
        mesh: snap.mesh,
        problems,
        mesh_unreadable,
    }
}

/// Keeps objects without errors. Two objects with one identity are both dropped: neither is
/// clearly the one meant, and keeping either could allow what the other forbids.
fn keep_valid<T>(
    kind: &str,
    objects: Vec<Object<T>>,
    validate: fn(&Object<T>) -> Vec<Problem>,
    problems: &mut Vec<Problem>,
) -> Vec<Object<T>> {
    let mut valid = Vec::new();
    for object in objects {
        let found = validate(&object);
        let ok = !found.iter().any(Problem::is_error);
        problems.extend(found);
        if ok {
            valid.push(object);
        }
    }
    let mut seen = BTreeMap::<String, usize>::new();
    for object in &valid {
        *seen.entry(object.id()).or_default() += 1;
    }
    valid.retain(|object| {
        let unique = seen[&object.id()] == 1;
        if !unique {
            problems.push(Problem::new(
                &object.origin,
                format!("{kind} {}", object.id()),
                "metadata.name",
                "defined more than once; every definition is skipped",
            ));
        }
        unique
    });
    valid
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        istio::DeclaredAs,
        sources::documents::{parse_documents, parse_service},
    };

    const USER: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api, namespace: shop}\nspec: {hosts: [api.example.com], ports: [{number: 443, name: https, protocol: TLS}], resolution: DNS}\n";
    const SERVICE: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api, namespace: shop}\nspec: {hosts: [api.shop.svc.cluster.local], addresses: [10.96.0.10], ports: [{number: 80, name: tcp-80, protocol: TCP}], resolution: STATIC}\n";

    fn service(snap: &mut Snapshot) {
        let value = serde_yaml::from_str(SERVICE).expect("yaml");
        parse_service(
            "kubernetes Service shop/api",
            "Service shop/api",
            value,
            snap,
        );
    }

    #[test]
    fn a_service_and_a_service_entry_of_one_name_are_both_kept() {
        let mut snap = parse_documents("f.yaml", USER);
        service(&mut snap);
        let checked = check(snap);
        assert!(checked.problems.is_empty(), "{:?}", checked.problems);
        let mut kinds: Vec<DeclaredAs> = checked
            .service_entries
            .iter()
            .map(|se| se.declared_as)
            .collect();
        kinds.sort();
        assert_eq!(kinds, [DeclaredAs::Istio, DeclaredAs::Service]);
    }

    #[test]
    fn two_objects_of_one_kind_and_name_are_both_dropped() {
        let mut snap = parse_documents("f.yaml", &format!("{USER}---\n{USER}"));
        let checked = check(snap);
        assert!(checked.service_entries.is_empty());
        assert_eq!(checked.problems.len(), 2, "{:?}", checked.problems);

        snap = Snapshot::default();
        service(&mut snap);
        service(&mut snap);
        assert!(check(snap).service_entries.is_empty());
    }
}
