//! `enforcer explain` against a running agent (its inputs and its pinned maps), and offline.

use crate::harness::{check, registry_only, Agent, Dns, Hosts, Want::*, World, ENFORCER};

const SHOP: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: https, protocol: HTTPS}, {number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: platform}
spec:
  hosts: [db.example.com]
  ports: [{number: 5432, name: pg, protocol: TCP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: web, namespace: shop}
spec:
  workloadSelector: {labels: {app: web}}
  egress: [{port: {number: 443, protocol: HTTPS, name: https}, hosts: ["./*"]}]
"#;

#[test]
fn explain_names_the_entry_or_the_reason_and_agrees_with_the_kernel() {
    let world = World::new("explain");
    let _hosts = Hosts::new(&world);
    let dns = Dns::new(
        &world,
        60,
        &[
            ("api.example.com", "198.51.100.10"),
            ("db.example.com", "198.51.100.20"),
        ],
    );
    world.write_policy("shop.yaml", SHOP);
    let mesh = registry_only(&world);
    let agent = Agent::start(
        &world,
        &[
            "--mesh-config",
            &mesh,
            "--dns-server",
            &dns.addr(),
            "--namespace",
            "shop",
        ],
    );
    // Run workloads of both scopes, so the kernel holds a mode for each.
    check(&agent, "shop", "tcp", "198.51.100.10", 80, Allowed);
    check(&agent, "shop:app=web", "tcp", "198.51.100.10", 80, Denied);

    let (code, out) = agent.explain(&["-n", "shop", "api.example.com:80"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("namespace shop: mode REGISTRY_ONLY, no Sidecar"),
        "{out}"
    );
    assert!(
        out.contains("198.51.100.10:80: ALLOWED: by ServiceEntry shop/api (host api.example.com) with rule 198.51.100.10:80/tcp"),
        "{out}"
    );
    assert!(out.contains("kernel: an exact allow entry"), "{out}");
    assert!(out.contains("so allowed"), "{out}");

    let (code, out) = agent.explain(&["-n", "shop", "--workload", "app=web", "api.example.com:80"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("mode REGISTRY_ONLY, Sidecar shop/web"),
        "{out}"
    );
    assert!(
        out.contains("does not import shop/api.example.com on port 80"),
        "{out}"
    );
    assert!(
        out.contains("kernel: no allow entry for scope shop/web"),
        "{out}"
    );
    assert!(out.contains("so refused"), "{out}");

    let (code, out) = agent.explain(&["-n", "shop", "198.51.100.20:5432"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "db.example.com is declared by ServiceEntry platform/db, exported only to [platform]"
        ),
        "{out}"
    );
    assert!(!out.contains("DISAGREES"), "{out}");

    let (code, out) = agent.explain(&["-n", "shop", "--udp", "127.0.0.1:9"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("always allowed (127.0.0.0/8"), "{out}");

    // The kernel is consulted, not just the files: a change the agent has not applied yet
    // shows as a disagreement. Stopping the agent leaves its maps enforcing the old state.
    let mut agent = agent;
    agent.stop();
    world.remove_policy("shop.yaml");
    let (code, out) = agent.explain(&["-n", "shop", "198.51.100.10:80"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("so allowed; this DISAGREES"), "{out}");

    // Offline: compiled from a directory, names resolved through the given server.
    world.write_policy("shop.yaml", SHOP);
    let out = std::process::Command::new(ENFORCER)
        .args(["explain", "-n", "platform", "--policies"])
        .arg(&world.policies)
        .args(["--mesh-config", &mesh, "--dns-server", &dns.addr()])
        .args([
            "--status-file",
            "/nonexistent",
            "--bpffs-root",
            "/sys/fs/bpf/enforcer-test-none",
        ])
        .arg("db.example.com:5432")
        .output()
        .expect("explain");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("ALLOWED: by ServiceEntry platform/db (host db.example.com)"),
        "{text}"
    );
    assert!(text.contains("no agent maps are pinned"), "{text}");

    let out = std::process::Command::new(ENFORCER)
        .args([
            "explain",
            "-n",
            "x",
            "--status-file",
            "/nonexistent",
            "a.example.com:1",
        ])
        .output()
        .expect("explain");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pass --policies DIR"));
}
