//! Turns the YAML documents of one file into Istio objects.

use serde::{de::DeserializeOwned, Deserialize};
use serde_yaml::Value;

use super::Snapshot;
use crate::{
    diag::Problem,
    istio::{
        DeclaredAs, MeshConfig, Object, ObjectMeta, ServiceEntrySpec, DEFAULT_NAMESPACE,
        NETWORKING_VERSIONS,
    },
};

/// Parses every document in `text`. `origin` names the file in problems.
pub fn parse_documents(origin: &str, text: &str) -> Snapshot {
    let mut out = Snapshot::default();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let label = format!("document {}", index + 1);
        let value = match Value::deserialize(doc) {
            Ok(value) => value,
            Err(err) => {
                // The parser cannot resynchronise after a syntax error, so the rest of the file is
                // unreadable too; its objects are skipped (fail closed).
                out.problems.push(Problem::new(
                    origin,
                    label,
                    "-",
                    format!("invalid YAML: {err}"),
                ));
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        parse_object(origin, &label, value, &mut out);
    }
    out
}

/// Parses a mesh config file: an IstioOperator, Istio's `istio` ConfigMap, or a bare MeshConfig.
pub fn parse_mesh_file(origin: &str, text: &str) -> Snapshot {
    let bare = serde_yaml::from_str::<Value>(text)
        .ok()
        .filter(|v| v.is_mapping() && v.get("kind").is_none());
    let Some(value) = bare else {
        return parse_documents(origin, text);
    };
    let mut out = Snapshot::default();
    match typed::<MeshConfig>(value) {
        Ok(mesh) => out.mesh.push((origin.to_string(), mesh)),
        Err((field, message)) => {
            out.problems
                .push(Problem::new(origin, "MeshConfig", field, message))
        }
    }
    out
}

/// What every document says about itself, before its kind decides the rest.
struct Header {
    kind: String,
    api_version: String,
    meta: ObjectMeta,
    /// `Kind namespace/name`, or the document's `label` when it has no name.
    object: String,
}

impl Header {
    fn of(label: &str, value: &Value) -> Self {
        let field = |key| {
            value
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let kind = field("kind");
        let meta: ObjectMeta = value
            .get("metadata")
            .cloned()
            .and_then(|m| serde_yaml::from_value(m).ok())
            .unwrap_or_default();
        let object = match (&meta.namespace, &meta.name) {
            (Some(ns), Some(name)) => format!("{kind} {ns}/{name}"),
            (None, Some(name)) => format!("{kind} {name}"),
            _ if kind.is_empty() => label.to_string(),
            _ => format!("{label} ({kind})"),
        };
        Self {
            api_version: field("apiVersion"),
            kind,
            meta,
            object,
        }
    }
}

/// Parses the ServiceEntry Istio derives from a Kubernetes Service (see `k8s::registry`):
/// checked as any ServiceEntry is, but marked as the Service it is. Only the caller knows
/// this; nothing in a document can claim it.
pub fn parse_service(origin: &str, label: &str, value: Value, out: &mut Snapshot) {
    let h = Header::of(label, &value);
    let parsed = networking::<ServiceEntrySpec>(
        origin,
        &h.object,
        &h.meta,
        &h.api_version,
        &value,
        &mut out.problems,
    );
    if let Some(mut se) = parsed {
        se.declared_as = DeclaredAs::Service;
        out.service_entries.push(se);
    }
}

pub fn parse_object(origin: &str, label: &str, value: Value, out: &mut Snapshot) {
    let Header {
        kind,
        api_version,
        meta,
        object,
    } = Header::of(label, &value);

    match kind.as_str() {
        "ServiceEntry" => {
            if let Some(se) = networking(
                origin,
                &object,
                &meta,
                &api_version,
                &value,
                &mut out.problems,
            ) {
                out.service_entries.push(se);
            }
        }
        "WorkloadEntry" => {
            if let Some(we) = networking(
                origin,
                &object,
                &meta,
                &api_version,
                &value,
                &mut out.problems,
            ) {
                out.workload_entries.push(we);
            }
        }
        "Sidecar" => {
            if let Some(sc) = networking(
                origin,
                &object,
                &meta,
                &api_version,
                &value,
                &mut out.problems,
            ) {
                out.sidecars.push(sc);
            }
        }
        "Gateway" | "VirtualService" | "DestinationRule" => {
            routing_object(origin, &kind, &object, &meta, &api_version, &value, out)
        }
        "IstioOperator" => {
            let mesh = value.get("spec").and_then(|s| s.get("meshConfig")).cloned();
            match mesh.map(typed::<MeshConfig>) {
                Some(Ok(mesh)) => out.mesh.push((format!("{origin} ({object})"), mesh)),
                Some(Err((field, message))) => out.problems.push(Problem::new(
                    origin,
                    object,
                    format!("spec.meshConfig.{field}"),
                    message,
                )),
                None => out
                    .ignored
                    .push(format!("{origin}: {object} has no spec.meshConfig")),
            }
        }
        "ConfigMap" if value.get("data").and_then(|d| d.get("mesh")).is_some() => {
            let text = value["data"]["mesh"].as_str().unwrap_or_default();
            match serde_yaml::from_str::<Value>(text)
                .map_err(|e| ("-".to_string(), e.to_string()))
                .and_then(typed::<MeshConfig>)
            {
                Ok(mesh) => out.mesh.push((format!("{origin} ({object})"), mesh)),
                Err((field, message)) => out.problems.push(Problem::new(
                    origin,
                    object,
                    format!("data.mesh.{field}"),
                    message,
                )),
            }
        }
        "" => out.problems.push(Problem::new(
            origin,
            object,
            "kind",
            "the document has no kind",
        )),
        _ => out.ignored.push(format!(
            "{origin}: {object} ({api_version}) is not enforced by enforcer"
        )),
    }
}

/// Gateway, VirtualService and DestinationRule. `Gateway` of `gateway.networking.k8s.io` is
/// another API, which is not read.
fn routing_object(
    origin: &str,
    kind: &str,
    object: &str,
    meta: &ObjectMeta,
    api_version: &str,
    value: &Value,
    out: &mut Snapshot,
) {
    if kind == "Gateway" && api_version.starts_with("gateway.networking.k8s.io/") {
        out.ignored.push(format!(
            "{origin}: {object} ({api_version}) is not enforced by enforcer"
        ));
        return;
    }
    let problems = &mut out.problems;
    match kind {
        "Gateway" => out.gateways.extend(networking(
            origin,
            object,
            meta,
            api_version,
            value,
            problems,
        )),
        "VirtualService" => out.virtual_services.extend(networking(
            origin,
            object,
            meta,
            api_version,
            value,
            problems,
        )),
        _ => out.destination_rules.extend(networking(
            origin,
            object,
            meta,
            api_version,
            value,
            problems,
        )),
    }
}

/// A `networking.istio.io` object: checks the version and the name, then types the spec.
fn networking<T: DeserializeOwned>(
    origin: &str,
    object: &str,
    meta: &ObjectMeta,
    api_version: &str,
    value: &Value,
    problems: &mut Vec<Problem>,
) -> Option<Object<T>> {
    if !NETWORKING_VERSIONS.contains(&api_version) {
        problems.push(Problem::new(
            origin,
            object,
            "apiVersion",
            format!(
                "unsupported apiVersion {api_version:?}; expected one of {NETWORKING_VERSIONS:?}"
            ),
        ));
        return None;
    }
    let Some(name) = meta.name.clone().filter(|n| !n.is_empty()) else {
        problems.push(Problem::new(
            origin,
            object,
            "metadata.name",
            "a name is required",
        ));
        return None;
    };
    let spec = value.get("spec").cloned().unwrap_or(Value::Null);
    match typed::<T>(spec) {
        Ok(spec) => Some(Object {
            namespace: meta
                .namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string()),
            name,
            spec,
            origin: origin.to_string(),
            declared_as: DeclaredAs::Istio,
            created: meta.creation_timestamp.clone(),
        }),
        Err((field, message)) => {
            problems.push(Problem::new(
                origin,
                object,
                format!("spec.{field}"),
                message,
            ));
            None
        }
    }
}

/// Deserializes with the failing field's path, e.g. `ports[0].number`.
fn typed<T: DeserializeOwned>(value: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let path = if path == "." { "-".to_string() } else { path };
        (path, err.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_several_documents_and_versions() {
        let text = r#"
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: a}
spec: {hosts: [a.example.com], ports: [{number: 80, name: http, protocol: HTTP}], resolution: DNS}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: b, namespace: frontend}
spec: {hosts: [b.example.com], ports: [{number: 5432, name: db, protocol: TCP}]}
"#;
        let snap = parse_documents("f.yaml", text);
        assert!(snap.problems.is_empty(), "{:?}", snap.problems);
        assert_eq!(snap.service_entries.len(), 2);
        assert_eq!(snap.service_entries[0].id(), "default/a");
        assert_eq!(snap.service_entries[1].id(), "frontend/b");
    }

    #[test]
    fn names_file_object_and_field() {
        let text = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bad, namespace: ns1}
spec: {hosts: [x.example.com], ports: [{number: eighty, name: http}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: good, namespace: ns1}
spec: {hosts: [y.example.com], ports: [{number: 80, name: http}]}
"#;
        let snap = parse_documents("dir/f.yaml", text);
        assert_eq!(snap.service_entries.len(), 1);
        let p = &snap.problems[0];
        assert_eq!(p.file, "dir/f.yaml");
        assert_eq!(p.object, "ServiceEntry ns1/bad");
        assert_eq!(p.field, "spec.ports[0].number");
    }

    #[test]
    fn rejects_unknown_resolution_and_api_version() {
        let text = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: r}
spec: {hosts: [x.example.com], resolution: MAGIC}
---
apiVersion: networking.istio.io/v2
kind: ServiceEntry
metadata: {name: v}
spec: {hosts: [x.example.com]}
"#;
        let snap = parse_documents("f.yaml", text);
        assert!(snap.service_entries.is_empty());
        assert_eq!(snap.problems[0].field, "spec.resolution");
        assert_eq!(snap.problems[1].field, "apiVersion");
    }

    #[test]
    fn mesh_config_forms() {
        let op = "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nspec:\n  meshConfig:\n    outboundTrafficPolicy:\n      mode: REGISTRY_ONLY\n";
        let bare = "outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\ndefaultServiceExportTo: ['*']\n";
        let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |\n    outboundTrafficPolicy:\n      mode: ALLOW_ANY\n";
        use crate::istio::OutboundMode::*;
        assert_eq!(parse_mesh_file("a", op).mesh[0].1.mode(), RegistryOnly);
        let bare = parse_mesh_file("b", bare);
        assert_eq!(bare.mesh[0].1.mode(), RegistryOnly);
        assert_eq!(
            bare.mesh[0].1.default_service_export_to,
            Some(vec!["*".to_string()])
        );
        assert_eq!(parse_mesh_file("c", cm).mesh[0].1.mode(), AllowAny);
        let bad = parse_mesh_file("d", "outboundTrafficPolicy:\n  mode: SOMETIMES\n");
        assert_eq!(bad.problems[0].field, "outboundTrafficPolicy.mode");
    }

    #[test]
    fn syntax_error_is_reported() {
        let snap = parse_documents("f.yaml", "kind: ServiceEntry\n  bad: [\n");
        assert_eq!(snap.problems.len(), 1);
        assert!(snap.problems[0].message.contains("invalid YAML"));
    }
}
