//! Namespaces: exportTo visibility, the mesh modes, and mapping existing cgroups.

use crate::harness::{check, registry_only, Agent, Hosts, Want::*, World};

const EXPORTS: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: postgres-db, namespace: frontend}
spec:
  hosts: [db.example.com]
  addresses: [198.51.100.20]
  ports: [{number: 5432, name: db, protocol: TCP}]
  resolution: STATIC
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shared, namespace: platform}
spec:
  hosts: [shared.example.com]
  addresses: [198.51.100.10]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  exportTo: ["*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: listed, namespace: platform}
spec:
  hosts: [listed.example.com]
  addresses: [198.51.100.11]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  exportTo: [".", "frontend"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: private, namespace: frontend}
spec:
  hosts: [private.example.com]
  addresses: [198.51.100.12]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  exportTo: ["~"]
"#;

#[test]
fn export_to_scopes_entries_across_namespaces() {
    let world = World::new("export");
    let _hosts = Hosts::new(&world);
    world.write_policy("exports.yaml", EXPORTS);
    let mesh = registry_only(&world);
    // `default` is not named by any object: its cgroup appears through `enforcer exec`.
    let agent = Agent::start(
        &world,
        &[
            "--mesh-config",
            &mesh,
            "--namespace",
            "frontend",
            "--namespace",
            "platform",
        ],
    );

    // Namespace-local by default (the seed's postgres example).
    check(&agent, "frontend", "tcp", "198.51.100.20", 5432, Allowed);
    check(&agent, "default", "tcp", "198.51.100.20", 5432, Denied);
    check(&agent, "platform", "tcp", "198.51.100.20", 5432, Denied);
    // exportTo "*": everyone, including a namespace that appears later.
    for ns in ["frontend", "platform", "default", "latecomer"] {
        check(&agent, ns, "tcp", "198.51.100.10", 443, Allowed);
    }
    // exportTo [".", "frontend"].
    check(&agent, "platform", "tcp", "198.51.100.11", 443, Allowed);
    check(&agent, "frontend", "tcp", "198.51.100.11", 443, Allowed);
    check(&agent, "default", "tcp", "198.51.100.11", 443, Denied);
    // exportTo "~": nobody, not even its own namespace.
    check(&agent, "frontend", "tcp", "198.51.100.12", 443, Denied);

    let denials = agent.denials();
    let d = denials
        .iter()
        .find(|d| d["namespace"] == "default" && d["port"] == 5432)
        .expect("refusal record");
    assert!(
        d["reason"]
            .as_str()
            .is_some_and(|r| r.contains("exported only to [frontend]")),
        "{d}"
    );
}

#[test]
fn allow_any_registry_only_and_audit() {
    let world = World::new("modes");
    let _hosts = Hosts::new(&world);
    world.write_policy(
        "one.yaml",
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: one}
spec: {hosts: [one.example.com], addresses: [198.51.100.10], ports: [{number: 80, name: http}], resolution: STATIC}
"#,
    );
    let mesh_path = world.dir.join("mesh.yaml");
    let mesh = mesh_path.display().to_string();
    let set_mode = |mode: &str| {
        let op = format!(
            "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nspec:\n  meshConfig:\n    outboundTrafficPolicy:\n      mode: {mode}\n"
        );
        std::fs::write(&mesh_path, op).expect("mesh");
    };

    set_mode("ALLOW_ANY");
    let agent = Agent::start(&world, &["--mesh-config", &mesh, "--namespace", "default"]);
    check(&agent, "default", "tcp", "203.0.113.30", 80, Allowed);
    assert!(agent.denials().is_empty(), "ALLOW_ANY reports nothing");

    set_mode("REGISTRY_ONLY");
    agent.eventually("default", "tcp", "203.0.113.30", 80, Denied);
    check(&agent, "default", "tcp", "198.51.100.10", 80, Allowed);

    set_mode("AUDIT");
    agent.eventually("default", "tcp", "203.0.113.30", 80, Allowed);
    // Records reach stdout a moment after the verdict (a CI run under load lost that race).
    agent.wait_for(
        std::time::Duration::from_secs(5),
        "AUDIT to report what REGISTRY_ONLY would refuse",
        || agent.denials().iter().any(|d| d["verdict"] == "audit"),
    );

    // A broken mesh config fails closed.
    std::fs::write(&mesh_path, "outboundTrafficPolicy:\n  mode: SOMETIMES\n").expect("mesh");
    agent.eventually("default", "tcp", "203.0.113.30", 80, Denied);
    check(&agent, "default", "tcp", "198.51.100.10", 80, Allowed);
    let problems = agent.status()["problems"].to_string();
    assert!(
        problems.contains("outboundTrafficPolicy.mode"),
        "{problems}"
    );
}

#[test]
fn existing_cgroup_mapped_to_a_namespace_with_descendants() {
    let world = World::new("cgmap");
    let _hosts = Hosts::new(&world);
    world.write_policy(
        "one.yaml",
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: one, namespace: batch}
spec: {hosts: [one.example.com], addresses: [198.51.100.10], ports: [{number: 80, name: http}], resolution: STATIC}
"#,
    );
    let root = enforcer_user::cgroup::cgroup2_mount().expect("cgroup2 mount");
    let service = format!("enforcer-svc-{}", world.id);
    let child = root.join(&service).join("worker");
    std::fs::create_dir_all(&child).expect("creating a service cgroup");
    let mesh = registry_only(&world);
    let agent = Agent::start(
        &world,
        &[
            "--mesh-config",
            &mesh,
            "--cgroup",
            &format!("batch={service}"),
        ],
    );

    let run_in = |dir: &std::path::Path, ip: &str| {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec {} {} tcp {ip} 80",
            dir.display(),
            enforcer_testkit::python(),
            enforcer_testkit::script("probe.py").display()
        );
        std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let service_dir = root.join(&service);
    let results = (
        run_in(&service_dir, "198.51.100.10"),
        run_in(&service_dir, "203.0.113.30"),
        run_in(&child, "203.0.113.30"),
    );
    let _ = std::fs::remove_dir(&child);
    let _ = std::fs::remove_dir(&service_dir);
    let (allowed, denied, denied_child) = results;
    assert!(
        allowed.as_deref().is_ok_and(|s| s.starts_with("ok")),
        "{allowed:?}\n{}",
        agent.log()
    );
    assert_eq!(denied.as_deref().ok(), Some("EPERM"));
    assert_eq!(
        denied_child.as_deref().ok(),
        Some("EPERM"),
        "descendants of a mapped cgroup belong to its namespace"
    );
}

#[test]
fn sidecar_overrides_the_mesh_per_namespace_and_narrows_imports() {
    let world = World::new("sidecar");
    let _hosts = Hosts::new(&world);
    world.write_policy(
        "sidecars.yaml",
        r#"
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: legacy}
spec: {outboundTrafficPolicy: {mode: ALLOW_ANY}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shared, namespace: platform}
spec:
  hosts: [api.example.com]
  addresses: [198.51.100.10]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  exportTo: ["*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mail, namespace: platform}
spec:
  hosts: [smtp.example.com]
  addresses: [198.51.100.11]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  exportTo: ["*"]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: shop}
spec: {egress: [{hosts: ["platform/api.example.com"]}]}
"#,
    );
    let mesh = registry_only(&world);
    let agent = Agent::start(
        &world,
        &[
            "--mesh-config",
            &mesh,
            "--namespace",
            "legacy",
            "--namespace",
            "shop",
            "--namespace",
            "default",
        ],
    );

    // REGISTRY_ONLY mesh, ALLOW_ANY namespace.
    check(&agent, "legacy", "tcp", "203.0.113.30", 80, Allowed);
    check(&agent, "default", "tcp", "203.0.113.30", 80, Denied);
    // egress.hosts imports only platform/api.example.com into shop.
    check(&agent, "shop", "tcp", "198.51.100.10", 443, Allowed);
    check(&agent, "shop", "tcp", "198.51.100.11", 443, Denied);
    check(&agent, "default", "tcp", "198.51.100.11", 443, Allowed);
    drop(agent);

    // The reverse: ALLOW_ANY mesh, a root-namespace Sidecar makes every namespace REGISTRY_ONLY,
    // and legacy's own Sidecar still wins for legacy.
    std::fs::write(
        world.dir.join("mesh.yaml"),
        "outboundTrafficPolicy:\n  mode: ALLOW_ANY\n",
    )
    .expect("mesh");
    world.write_policy(
        "root.yaml",
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: istio-system}\nspec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n",
    );
    let agent = Agent::start(
        &world,
        &[
            "--mesh-config",
            &mesh,
            "--namespace",
            "legacy",
            "--namespace",
            "default",
        ],
    );
    check(&agent, "default", "tcp", "203.0.113.30", 80, Denied);
    check(&agent, "legacy", "tcp", "203.0.113.30", 80, Allowed);
}

/// A Sidecar that selects workloads by label governs those workloads only, and a listener with a
/// port imports its hosts on that port only.
#[test]
fn workload_sidecars_select_by_label_and_listeners_by_port() {
    let world = World::new("wlsidecar");
    let _hosts = Hosts::new(&world);
    world.write_policy(
        "shop.yaml",
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  addresses: [198.51.100.10]
  ports: [{number: 443, name: https, protocol: HTTPS}, {number: 80, name: http, protocol: HTTP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: web, namespace: shop}
spec:
  workloadSelector: {labels: {app: web}}
  egress:
  - port: {number: 443, protocol: HTTPS, name: https}
    hosts: ["./api.example.com"]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: batch, namespace: shop}
spec:
  workloadSelector: {labels: {app: batch}}
  outboundTrafficPolicy: {mode: ALLOW_ANY}
"#,
    );
    let mesh = registry_only(&world);
    let agent = Agent::start(&world, &["--mesh-config", &mesh, "--namespace", "shop"]);

    // Unlabelled workloads: the namespace's scope, both ports of the entry, nothing else.
    check(&agent, "shop", "tcp", "198.51.100.10", 443, Allowed);
    check(&agent, "shop", "tcp", "198.51.100.10", 80, Allowed);
    check(&agent, "shop", "tcp", "203.0.113.30", 80, Denied);
    // app=web: only the 443 listener imports the entry.
    check(&agent, "shop:app=web", "tcp", "198.51.100.10", 443, Allowed);
    check(
        &agent,
        "shop:app=web,version=v2",
        "tcp",
        "198.51.100.10",
        80,
        Denied,
    );
    // app=batch: ALLOW_ANY for that workload only.
    check(&agent, "shop:app=batch", "tcp", "203.0.113.30", 80, Allowed);
    check(&agent, "shop:app=other", "tcp", "203.0.113.30", 80, Denied);

    let denial = agent
        .denials()
        .into_iter()
        .find(|d| d["sidecar"] == "shop/web")
        .expect("a refusal record for the web workload");
    let reason = denial["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("does not import shop/api.example.com on port 80"),
        "{denial}"
    );
    assert!(
        denial["cgroup"]
            .as_str()
            .is_some_and(|c| c.ends_with("/shop/app=web,version=v2")),
        "{denial}"
    );

    // Deleting the Sidecar puts its workloads back in the namespace's scope, live.
    world.write_policy(
        "shop.yaml",
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  addresses: [198.51.100.10]
  ports: [{number: 443, name: https, protocol: HTTPS}, {number: 80, name: http, protocol: HTTP}]
  resolution: NONE
"#,
    );
    agent.eventually("shop:app=web", "tcp", "198.51.100.10", 80, Allowed);
    agent.eventually("shop:app=batch", "tcp", "203.0.113.30", 80, Denied);
}

fn entry(ns: &str, addr: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: e, namespace: {ns}}}\n\
         spec: {{hosts: [{ns}.example.com], addresses: [{addr}], ports: [{{number: 80, name: http, protocol: HTTP}}], resolution: STATIC}}\n"
    )
}

/// A full scope-name map never stops the agent: the scope that gets no id fails closed on its
/// own, the others keep working, and an id freed by a scope that went is given to it.
#[test]
fn a_full_scope_map_fails_one_scope_closed_and_ids_come_back() {
    let world = World::new("scopeids");
    let _hosts = Hosts::new(&world);
    world.write_policy("a.yaml", &entry("a", "198.51.100.10"));
    world.write_policy("b.yaml", &entry("b-gone", "198.51.100.12"));
    world.write_policy("z.yaml", &entry("z", "198.51.100.11"));
    let mesh = registry_only(&world);
    // Room for three names: the agent's own scope, a and b-gone. z sorts last and gets none.
    let agent = Agent::start(
        &world,
        &[
            "--mesh-config",
            &mesh,
            "--namespace",
            "a",
            "--namespace",
            "z",
            "--max-scopes",
            "3",
        ],
    );
    check(&agent, "a", "tcp", "198.51.100.10", 80, Allowed);
    check(&agent, "z", "tcp", "198.51.100.11", 80, Denied);
    assert!(
        agent.log().contains("scope z has no id"),
        "the failure is reported\n{}",
        agent.log()
    );
    // b-gone has no workloads: once its entry goes, its id is free, and z gets it.
    world.remove_policy("b.yaml");
    agent.eventually("z", "tcp", "198.51.100.11", 80, Allowed);
    check(&agent, "z", "tcp", "198.51.100.12", 80, Denied);
    check(&agent, "a", "tcp", "198.51.100.10", 80, Allowed);
}
