//! The example policies in `policies/` are valid and mean what the seeds say.

use std::path::Path;

use enforcer_user::{
    istio::OutboundMode,
    policy::{
        validate_destination_rule, validate_gateway, validate_service_entry,
        validate_virtual_service,
    },
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
            // Seed 001, step 5: the gateway's Service in local mode.
            "istio-system/istio-egressgateway",
            "egress/external-svc-httpbin",
            "default/external-svc-https",
            "default/external-svc-mongocluster",
            "default/wikipedia-egress",
            "default/external-svc",
            // Seed 003: Istio's samples/external, and a wildcard.
            "default/github-https",
            "default/github-tcp",
            "default/make-aptget-work",
            "default/pypi-https",
            "default/wikipedia-wildcard",
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
    // Seed 001, step 5, with the misplaced `port` moved into the match: no warning either.
    let ids = |v: Vec<String>| v;
    assert_eq!(
        ids(snap.gateways.iter().map(|g| g.id()).collect()),
        ["istio-system/istio-egressgateway"]
    );
    assert_eq!(
        ids(snap.virtual_services.iter().map(|v| v.id()).collect()),
        ["default/wikipedia-egress-gateway"]
    );
    assert_eq!(
        ids(snap.destination_rules.iter().map(|d| d.id()).collect()),
        ["default/egressgateway-for-wikipedia"]
    );
    for problems in snap
        .gateways
        .iter()
        .map(validate_gateway)
        .chain(snap.virtual_services.iter().map(validate_virtual_service))
        .chain(snap.destination_rules.iter().map(validate_destination_rule))
    {
        assert!(problems.is_empty(), "{problems:?}");
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

#[test]
fn validate_command_accepts_the_examples_and_locates_errors() {
    let enforcer = env!("CARGO_BIN_EXE_enforcer");
    let out = std::process::Command::new(enforcer)
        .arg("validate")
        .arg("-f")
        .arg(policies())
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("0 errors"), "{text}");

    let dir = std::env::temp_dir().join(format!("enforcer-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: bad, namespace: ns1}\nspec: {hosts: ['*foo.com', a.example.com], ports: [{number: 5432, name: db, protocol: TCP}], resolution: DNS}\n",
    )
    .expect("write");
    let out = std::process::Command::new(enforcer)
        .arg("validate")
        .arg("-f")
        .arg(&dir)
        .output()
        .expect("run");
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("error: {}: ServiceEntry ns1/bad: spec.hosts: multiple hosts provided with non-HTTP, non-TLS ports", bad.display())), "{text}");
    assert!(
        text.contains("warning:") && text.contains("partial wildcard"),
        "{text}"
    );
}

/// `enforcer analyze` finds nothing wrong with the examples, and reports cross-object problems
/// in a directory that has them, with stable codes, and exit 1 on errors.
#[test]
fn analyze_cli() {
    let run = |dir: &Path, extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_enforcer"))
            .args(["analyze", "--offline", "--status-file", "/nonexistent"])
            .args(["--cgroup-parent", "enforcer-analyze-test-none"])
            .arg("--policies")
            .arg(dir)
            .args(extra)
            .output()
            .expect("running enforcer analyze");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let mesh = policies().join("mesh/registry-only.yaml");
    let (code, text) = run(&policies(), &["--mesh-config", &mesh.display().to_string()]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("No validation issues found"), "{text}");

    let dir = std::env::temp_dir().join(format!("enforcer-analyze-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("shop.yaml"),
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
  exportTo: [ghost]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: a, namespace: shop}
spec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: b, namespace: shop}
spec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}
"#,
    )
    .unwrap();
    let (code, text) = run(&dir, &[]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, Some(1), "{text}");
    for want in [
        "Warning [ENF0101] (ServiceEntry shop/api",
        "Error [IST0111] (Sidecar shop/a",
        "Error [IST0111] (Sidecar shop/b",
        "Warning [ENF0104] (namespace shop)",
        "2 errors, 2 warnings",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
}
