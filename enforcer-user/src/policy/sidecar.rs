//! Sidecar semantics per namespace, with Istio's precedence: the namespace's Sidecar without a
//! workloadSelector, else the root namespace's, else the mesh. Sidecars that select workloads
//! cannot be honoured per workload yet, so they may only tighten their namespace (fail closed).

use crate::istio::{OutboundMode, ServiceEntry, Sidecar};

/// What applies to one namespace.
#[derive(Debug, Default)]
pub struct NamespaceSidecar<'a> {
    /// The Sidecar in force, if any.
    pub sidecar: Option<&'a Sidecar>,
    pub mode: OutboundMode,
    pub notes: Vec<String>,
}

pub fn for_namespace<'a>(
    ns: &str,
    sidecars: &'a [Sidecar],
    root_namespace: &str,
    mesh_mode: OutboundMode,
) -> NamespaceSidecar<'a> {
    let unselected = |in_ns: &str| {
        let mut found = sidecars
            .iter()
            .filter(move |s| s.namespace == in_ns && s.spec.workload_selector.is_none());
        let first = found.next();
        (first, found.next().is_some())
    };
    let mut notes = Vec::new();
    let (own, own_ambiguous) = unselected(ns);
    let sidecar = own.or_else(|| unselected(root_namespace).0);
    if own_ambiguous {
        notes.push(format!(
            "namespace {ns} has more than one Sidecar without a workloadSelector; using {}",
            own.map(|s| s.id()).unwrap_or_default()
        ));
    }
    let mut mode = sidecar
        .and_then(|s| s.spec.outbound_traffic_policy.as_ref())
        .and_then(|p| p.mode)
        .unwrap_or(mesh_mode);
    for selecting in sidecars
        .iter()
        .filter(|s| s.namespace == ns && s.spec.workload_selector.is_some())
    {
        let wants = selecting
            .spec
            .outbound_traffic_policy
            .as_ref()
            .and_then(|p| p.mode);
        match wants {
            Some(OutboundMode::RegistryOnly) if mode != OutboundMode::RegistryOnly => {
                mode = OutboundMode::RegistryOnly;
                notes.push(format!(
                    "Sidecar {} selects workloads; per-workload policy is not enforced yet, so all of namespace {ns} is REGISTRY_ONLY (fail closed)",
                    selecting.id()
                ));
            }
            Some(_) => notes.push(format!(
                "Sidecar {} selects workloads; per-workload policy is not enforced yet and it cannot loosen namespace {ns}",
                selecting.id()
            )),
            None => {}
        }
    }
    NamespaceSidecar {
        sidecar,
        mode,
        notes,
    }
}

impl NamespaceSidecar<'_> {
    /// Whether namespace `ns` imports `se`: a Sidecar with egress hosts imports only the
    /// entries one of its `namespace/host` patterns matches; without egress, everything visible.
    pub fn imports(&self, ns: &str, se: &ServiceEntry) -> bool {
        let Some(sidecar) = self.sidecar else {
            return true;
        };
        if sidecar.spec.egress.is_empty() {
            return true;
        }
        sidecar
            .spec
            .egress
            .iter()
            .flat_map(|e| &e.hosts)
            .any(|pattern| {
                let Some((want_ns, want_host)) = pattern.split_once('/') else {
                    return false;
                };
                let ns_ok = match want_ns {
                    "*" => true,
                    "~" => false,
                    "." => se.namespace == ns,
                    other => se.namespace == other,
                };
                ns_ok && se.spec.hosts.iter().any(|h| host_matches(want_host, h))
            })
    }
}

/// `*` matches all; `*.example.com` matches names under it (and `*.example.com` itself); a plain
/// name matches itself.
fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" || pattern == host {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::documents::parse_documents;

    fn load(yaml: &str) -> (Vec<Sidecar>, Vec<ServiceEntry>) {
        let snap = parse_documents("t.yaml", yaml);
        assert!(snap.problems.is_empty(), "{:?}", snap.problems);
        (snap.sidecars, snap.service_entries)
    }

    const OBJECTS: &str = r#"
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: istio-system}
spec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: legacy}
spec: {outboundTrafficPolicy: {mode: ALLOW_ANY}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: shop}
spec: {egress: [{hosts: ["./*", "platform/*.payments.example.com"]}]}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: locked, namespace: open}
spec: {workloadSelector: {labels: {app: db}}, outboundTrafficPolicy: {mode: REGISTRY_ONLY}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pay, namespace: platform}
spec: {hosts: [api.payments.example.com], ports: [{number: 443, name: https, protocol: TLS}], resolution: DNS}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mail, namespace: platform}
spec: {hosts: [smtp.example.com], ports: [{number: 25, name: smtp, protocol: TCP}], resolution: DNS}
"#;

    #[test]
    fn precedence_namespace_then_root_then_mesh() {
        let (sidecars, _) = load(OBJECTS);
        let mode =
            |ns: &str, root: &str| for_namespace(ns, &sidecars, root, OutboundMode::AllowAny).mode;
        assert_eq!(
            mode("legacy", "istio-system"),
            OutboundMode::AllowAny,
            "the namespace's own Sidecar wins"
        );
        assert_eq!(
            mode("frontend", "istio-system"),
            OutboundMode::RegistryOnly,
            "then the root namespace's"
        );
        assert_eq!(
            mode("frontend", "elsewhere"),
            OutboundMode::AllowAny,
            "then the mesh"
        );
        // shop's Sidecar sets no mode: the mesh decides.
        assert_eq!(mode("shop", "istio-system"), OutboundMode::AllowAny);
    }

    #[test]
    fn a_selecting_sidecar_only_tightens_its_namespace() {
        let (sidecars, _) = load(OBJECTS);
        let open = for_namespace("open", &sidecars, "nowhere", OutboundMode::AllowAny);
        assert_eq!(open.mode, OutboundMode::RegistryOnly);
        assert!(open.notes[0].contains("fail closed"));
    }

    #[test]
    fn egress_hosts_narrow_imports() {
        let (sidecars, entries) = load(OBJECTS);
        let shop = for_namespace(
            "shop",
            &sidecars,
            "istio-system",
            OutboundMode::RegistryOnly,
        );
        let (pay, mail) = (&entries[0], &entries[1]);
        assert!(shop.imports("shop", pay), "platform/*.payments.example.com");
        assert!(!shop.imports("shop", mail));
        let frontend = for_namespace(
            "frontend",
            &sidecars,
            "istio-system",
            OutboundMode::RegistryOnly,
        );
        assert!(
            frontend.imports("frontend", mail),
            "no egress section: everything visible"
        );
    }

    #[test]
    fn host_patterns() {
        assert!(host_matches("*", "a.b"));
        assert!(host_matches("*.example.com", "api.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(host_matches("api.example.com", "api.example.com"));
        assert!(!host_matches("api.example.com", "www.example.com"));
    }
}
