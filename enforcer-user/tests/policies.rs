//! The example policies in `policies/` are valid and mean what the seeds say.

use std::path::Path;

use enforcer_user::{
    istio::OutboundMode,
    policy::validate_service_entry,
    sources::files::{load_dir, load_mesh_file},
};

fn policies() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

#[test]
fn example_service_entries_are_valid() {
    let snap = load_dir(&policies());
    assert!(snap.problems.is_empty(), "{:?}", snap.problems);
    assert!(
        snap.mesh.is_empty(),
        "mesh configs live in policies/mesh/, so that the directory can be run as is"
    );
    let ids: Vec<String> = snap.service_entries.iter().map(|se| se.id()).collect();
    assert_eq!(
        ids,
        [
            "frontend/postgres-db",
            "egress/external-svc-httpbin",
            "default/external-svc-https",
            "default/external-svc-mongocluster",
            "default/wikipedia-egress",
        ]
    );
    for se in &snap.service_entries {
        assert!(
            validate_service_entry(se).is_empty(),
            "{}: {:?}",
            se.id(),
            validate_service_entry(se)
        );
    }
}

#[test]
fn example_mesh_configs() {
    for (file, mode) in [
        ("allow-any.yaml", OutboundMode::AllowAny),
        ("registry-only.yaml", OutboundMode::RegistryOnly),
    ] {
        let snap = load_mesh_file(&policies().join("mesh").join(file));
        assert!(snap.problems.is_empty(), "{file}: {:?}", snap.problems);
        assert_eq!(snap.mesh.len(), 1, "{file}");
        assert_eq!(snap.mesh[0].1.mode(), mode, "{file}");
    }
}
