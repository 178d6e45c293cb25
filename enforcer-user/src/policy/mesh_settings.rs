//! The mesh-wide settings that decide egress, beside the objects.

use std::collections::BTreeSet;

use crate::istio::{DeclaredAs, OutboundMode, ServiceEntry};

/// The mesh-wide settings that decide egress.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshSettings {
    pub mode: OutboundMode,
    /// The mesh's `defaultServiceExportTo`, when it sets one: then it applies to every entry
    /// without its own `exportTo`, Services' included. See [`MeshSettings::export_to`].
    pub default_export_to: Option<Vec<String>>,
    /// Namespaces in AUDIT whatever their Sidecars and the mesh say: a dry run before
    /// REGISTRY_ONLY (the `egress-enforcer=audit` label, `--audit-namespace`).
    pub audit_namespaces: BTreeSet<String>,
}

impl MeshSettings {
    /// The `exportTo` `se` is under: its own (for a Service, its annotation), else the mesh's
    /// default, else the default of its kind. ServiceEntries are namespace-local, as the seeds
    /// describe; Services are visible everywhere, as in Istio, or every REGISTRY_ONLY pod
    /// would lose istiod, `kubernetes.default` and the other namespaces' Services.
    pub fn export_to<'a>(&'a self, se: &'a ServiceEntry) -> Vec<&'a str> {
        if let Some(list) = se
            .spec
            .export_to
            .as_ref()
            .or(self.default_export_to.as_ref())
        {
            return list.iter().map(String::as_str).collect();
        }
        match se.declared_as {
            DeclaredAs::Istio => vec!["."],
            DeclaredAs::Service => vec!["*"],
        }
    }
}
