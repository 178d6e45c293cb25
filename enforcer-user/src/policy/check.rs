//! Validation of everything read at once: each object checked on its own, then identities.
//! The agent and `enforcer validate` share this, so both reject exactly the same objects.

use std::collections::BTreeMap;

use super::{validate_service_entry, validate_sidecar, validate_workload_entry};
use crate::{
    diag::Problem,
    istio::{MeshConfig, Object, ServiceEntry, Sidecar, WorkloadEntry},
    sources::Snapshot,
};

/// The valid objects, and every problem found (errors and warnings).
#[derive(Debug, Default)]
pub struct Checked {
    pub service_entries: Vec<ServiceEntry>,
    pub workload_entries: Vec<WorkloadEntry>,
    pub sidecars: Vec<Sidecar>,
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
    Checked {
        service_entries,
        workload_entries,
        sidecars,
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
