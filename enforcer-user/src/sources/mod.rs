//! Where policy comes from. Local mode reads a directory of Istio YAML; Kubernetes mode (later)
//! reads the same objects from the API server. Both produce a [`Snapshot`].

pub mod documents;
pub mod files;
mod validated;

pub use validated::Sources;

use crate::{
    diag::Problem,
    istio::{
        DestinationRule, Gateway, MeshConfig, ServiceEntry, Sidecar, VirtualService, WorkloadEntry,
    },
};

/// Everything read from the sources at one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub service_entries: Vec<ServiceEntry>,
    pub workload_entries: Vec<WorkloadEntry>,
    pub sidecars: Vec<Sidecar>,
    pub gateways: Vec<Gateway>,
    pub virtual_services: Vec<VirtualService>,
    pub destination_rules: Vec<DestinationRule>,
    /// Mesh configs found, with their origin. More than one is an error.
    pub mesh: Vec<(String, MeshConfig)>,
    pub problems: Vec<Problem>,
    /// Objects understood but not enforced here (other kinds), for the log.
    pub ignored: Vec<String>,
}

impl Snapshot {
    pub fn merge(&mut self, other: Snapshot) {
        self.service_entries.extend(other.service_entries);
        self.workload_entries.extend(other.workload_entries);
        self.sidecars.extend(other.sidecars);
        self.gateways.extend(other.gateways);
        self.virtual_services.extend(other.virtual_services);
        self.destination_rules.extend(other.destination_rules);
        self.mesh.extend(other.mesh);
        self.problems.extend(other.problems);
        self.ignored.extend(other.ignored);
    }
}
