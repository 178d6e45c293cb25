//! The policy sources read and validated: what the compiler needs besides DNS answers and
//! cgroups. Shared by the agent, `explain` and `analyze`.

use std::path::Path;

use super::files;
use crate::datapath::plan::PodAssignment;
use crate::{
    diag::Problem,
    istio::{
        DestinationRule, Gateway, OutboundMode, ServiceEntry, Sidecar, VirtualService,
        WorkloadEntry,
    },
    observe::status::Inputs,
    policy::{self, Desired, MeshSettings},
    sources::Snapshot,
};

/// The sources, validated: what the compiler needs besides DNS answers and cgroups.
pub struct Sources {
    pub entries: Vec<ServiceEntry>,
    pub workloads: Vec<WorkloadEntry>,
    pub sidecars: Vec<Sidecar>,
    pub gateways: Vec<Gateway>,
    pub virtual_services: Vec<VirtualService>,
    pub destination_rules: Vec<DestinationRule>,
    pub mesh: MeshSettings,
    /// Every problem, as logged (warnings prefixed).
    pub problems: Vec<String>,
    /// The objects' own problems, located, for `analyze`.
    pub diagnostics: Vec<Problem>,
}

impl Sources {
    /// Reads and validates a policy directory and an optional mesh config file, logging each
    /// problem.
    pub fn load(policies: &Path, mesh_config: Option<&Path>) -> Self {
        let mut snap = files::load_dir(policies);
        if let Some(path) = mesh_config {
            snap.merge(files::load_mesh_file(path));
        }
        Self::from_snapshot(snap)
    }

    /// Validates objects read elsewhere (the API server), logging each problem.
    pub fn from_snapshot(snap: Snapshot) -> Self {
        for ignored in &snap.ignored {
            log::info!("{ignored}");
        }
        validate(snap)
    }

    /// Compiles these sources with the other inputs. Running pods are endpoints of the
    /// ServiceEntries whose `workloadSelector` selects them, as Istio makes them (an egress
    /// gateway's Service, seed 002's pod behind a WorkloadEntry's selector).
    pub fn compile(&self, inputs: &Inputs) -> Desired {
        let mut workloads = self.workloads.clone();
        workloads.extend(inputs.endpoint_pods.iter().map(pod_entry));
        let mesh = MeshSettings {
            audit_namespaces: inputs.audit_namespaces.clone(),
            ..self.mesh.clone()
        };
        policy::compile(&policy::Inputs {
            service_entries: &self.entries,
            mesh: &mesh,
            namespaces: &inputs.namespaces,
            dns: &inputs.answers,
            dns_servers: &inputs.dns_servers,
            allow_cidrs: &inputs.allow_cidrs,
            istio_compat: inputs.istio_compat,
            sidecars: &self.sidecars,
            workload_entries: &workloads,
            root_namespace: &inputs.root_namespace,
            only_namespaces: inputs.only_namespaces.as_ref(),
            routing: self.routing(inputs),
        })
    }

    /// The routing objects, for the compiler.
    pub fn routing(&self, inputs: &Inputs) -> policy::Routing<'_> {
        policy::Routing {
            gateways: &self.gateways,
            virtual_services: &self.virtual_services,
            destination_rules: &self.destination_rules,
            gateway_only: inputs.egress_gateway_only,
            any_namespace: inputs.gateway_any_namespace,
        }
    }
}

/// A pod's address as the WorkloadEntry Istio would see for it.
fn pod_entry(pod: &PodAssignment) -> WorkloadEntry {
    WorkloadEntry {
        namespace: pod.namespace.clone(),
        name: format!("pod-{}", pod.ip),
        spec: crate::istio::WorkloadEntrySpec {
            address: Some(pod.ip.to_string()),
            labels: pod.labels.clone(),
            ..Default::default()
        },
        origin: "running pod".to_string(),
        declared_as: crate::istio::DeclaredAs::Istio,
        created: None,
    }
}

/// Keeps the valid objects; every problem is logged with its file, object and field.
fn validate(snap: Snapshot) -> Sources {
    let checked = policy::check::check(snap);
    let mut problems: Vec<String> = Vec::new();
    for p in &checked.problems {
        if p.is_error() {
            log::error!("{p}");
            problems.push(p.to_string());
        } else {
            log::warn!("{p}");
            problems.push(format!("warning: {p}"));
        }
    }
    let mut errors = Vec::new();
    let mesh = match checked.mesh.as_slice() {
        [] if checked.mesh_unreadable => {
            errors.push(
                "the mesh config could not be read; enforcing REGISTRY_ONLY until it is fixed"
                    .to_string(),
            );
            MeshSettings {
                mode: OutboundMode::RegistryOnly,
                ..MeshSettings::default()
            }
        }
        [] => MeshSettings::default(),
        [(origin, mesh)] => {
            let mut settings = MeshSettings {
                mode: mesh.mode(),
                ..MeshSettings::default()
            };
            if let Some(list) = &mesh.default_service_export_to {
                let errs = policy::export_to_errors(list);
                if errs.is_empty() {
                    settings.default_export_to = Some(list.clone());
                } else {
                    errors.extend(
                        errs.iter()
                            .map(|e| format!("{origin}: defaultServiceExportTo: {e}")),
                    );
                }
            }
            settings
        }
        many => {
            let origins: Vec<&str> = many.iter().map(|(o, _)| o.as_str()).collect();
            errors.push(format!(
                "more than one mesh config ({}); enforcing REGISTRY_ONLY until one remains",
                origins.join(", ")
            ));
            MeshSettings {
                mode: OutboundMode::RegistryOnly,
                ..MeshSettings::default()
            }
        }
    };
    for e in &errors {
        log::error!("{e}");
    }
    problems.extend(errors);
    log::info!(
        "policy: {} ServiceEntries, {} WorkloadEntries, {} Sidecars, mesh mode {}, {} problems",
        checked.service_entries.len(),
        checked.workload_entries.len(),
        checked.sidecars.len(),
        mesh.mode,
        problems.len()
    );
    Sources {
        entries: checked.service_entries,
        workloads: checked.workload_entries,
        sidecars: checked.sidecars,
        gateways: checked.gateways,
        virtual_services: checked.virtual_services,
        destination_rules: checked.destination_rules,
        mesh,
        problems,
        diagnostics: checked.problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::documents::parse_mesh_file;

    #[test]
    fn an_audit_namespace_is_in_audit_whatever_its_sidecars_say() {
        let yaml = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: strict, namespace: shop}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n  workloadSelector: {labels: {app: web}}\n";
        let sources =
            Sources::from_snapshot(crate::sources::documents::parse_documents("f.yaml", yaml));
        let mut inputs = Inputs {
            namespaces: ["shop".to_string(), "other".to_string()].into(),
            ..Inputs::default()
        };
        inputs.audit_namespaces.insert("shop".into());
        let d = sources.compile(&inputs);
        assert_eq!(d.scopes["shop"].mode, OutboundMode::Audit);
        assert_eq!(d.scopes["shop/strict"].mode, OutboundMode::Audit);
        assert_eq!(d.scopes["other"].mode, OutboundMode::AllowAny);
    }

    #[test]
    fn a_mesh_default_export_to_is_kept_only_when_set() {
        let unset = Sources::from_snapshot(parse_mesh_file(
            "mesh.yaml",
            "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n",
        ));
        assert_eq!(unset.mesh.default_export_to, None);
        let set = Sources::from_snapshot(parse_mesh_file(
            "mesh.yaml",
            "defaultServiceExportTo: ['.']\n",
        ));
        assert_eq!(set.mesh.default_export_to, Some(vec![".".to_string()]));
    }
}
