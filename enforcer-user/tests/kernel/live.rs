//! Changes while running: files added, removed and broken; DNS answers that change; restarts.

use crate::harness::{check, registry_only, Agent, Dns, Hosts, Want::*, World, ENFORCER};

fn entry(name: &str, ip: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\nspec:\n  hosts: [{name}.example.com]\n  addresses: [{ip}]\n  ports: [{{number: {port}, name: p, protocol: TCP}}]\n  resolution: STATIC\n"
    )
}

fn start(world: &World, extra: &[&str]) -> Agent {
    let mut args = vec![
        "--mesh-config".to_string(),
        registry_only(world),
        "--namespace".into(),
        "default".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start(world, &args)
}

#[test]
fn adding_and_removing_a_file_takes_effect_live() {
    let world = World::new("live");
    let _hosts = Hosts::new(&world);
    let agent = start(&world, &[]);
    check(&agent, "default", "tcp", "198.51.100.10", 5432, Denied);

    world.write_policy("db.yaml", &entry("db", "198.51.100.10", 5432));
    agent.eventually("default", "tcp", "198.51.100.10", 5432, Allowed);

    // Editing the file in place moves the permission.
    world.write_policy("db.yaml", &entry("db", "198.51.100.11", 5432));
    agent.eventually("default", "tcp", "198.51.100.10", 5432, Denied);
    check(&agent, "default", "tcp", "198.51.100.11", 5432, Allowed);

    world.remove_policy("db.yaml");
    agent.eventually("default", "tcp", "198.51.100.11", 5432, Denied);
}

#[test]
fn an_invalid_file_next_to_valid_ones_is_reported_and_skipped() {
    let world = World::new("invalid");
    let _hosts = Hosts::new(&world);
    world.write_policy("a-good.yaml", &entry("good", "198.51.100.10", 80));
    world.write_policy(
        "b-bad.yml",
        &entry("bad", "198.51.100.11", 80).replace("number: 80", "number: 70000"),
    );
    world.write_policy("c-broken.yaml", "kind: ServiceEntry\nspec: [unclosed\n");
    let agent = start(&world, &[]);

    check(&agent, "default", "tcp", "198.51.100.10", 80, Allowed);
    check(&agent, "default", "tcp", "198.51.100.11", 80, Denied);
    let problems = agent.status()["problems"].to_string();
    assert!(
        problems.contains("b-bad.yml: ServiceEntry default/bad: spec.ports[0].number"),
        "{problems}"
    );
    assert!(problems.contains("c-broken.yaml: document 1"), "{problems}");
    assert!(agent
        .log()
        .contains("b-bad.yml: ServiceEntry default/bad: spec.ports[0].number"));

    // Breaking a working entry withdraws it (fail closed) and leaves the others alone.
    world.write_policy(
        "a-good.yaml",
        &entry("good", "198.51.100.10", 80).replace("resolution: STATIC", "resolution: SOMETIMES"),
    );
    agent.eventually("default", "tcp", "198.51.100.10", 80, Denied);
    world.write_policy("d-other.yaml", &entry("other", "198.51.100.12", 80));
    agent.eventually("default", "tcp", "198.51.100.12", 80, Allowed);
}

#[test]
fn a_dns_answer_that_changes_after_its_ttl_keeps_the_old_address_for_the_grace_period() {
    let world = World::new("ttl");
    let _hosts = Hosts::new(&world);
    let dns = Dns::new(&world, 1, &[("api.example.com", "198.51.100.10")]);
    world.write_policy(
        "api.yaml",
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api}\nspec:\n  hosts: [api.example.com]\n  ports: [{number: 443, name: https, protocol: HTTPS}]\n  resolution: DNS\n",
    );
    let agent = start(
        &world,
        &[
            "--dns-server",
            &dns.addr(),
            "--dns-min-ttl",
            "1",
            "--dns-grace",
            "3",
        ],
    );
    check(&agent, "default", "tcp", "198.51.100.10", 443, Allowed);
    check(&agent, "default", "tcp", "198.51.100.11", 443, Denied);

    dns.set_records(&[("api.example.com", "198.51.100.11")]);
    agent.eventually("default", "tcp", "198.51.100.11", 443, Allowed);
    let changed = std::time::Instant::now();
    // An application that cached the old answer keeps working for the grace period...
    check(&agent, "default", "tcp", "198.51.100.10", 443, Allowed);
    assert!(
        changed.elapsed() < std::time::Duration::from_secs(2),
        "the check above ran inside the grace period"
    );
    // ...and is refused once it ends.
    agent.eventually("default", "tcp", "198.51.100.10", 443, Denied);
    assert!(
        changed.elapsed() >= std::time::Duration::from_secs(2),
        "refused before the grace period ended"
    );
    let log = agent.log();
    assert!(
        log.contains("answer changed") && log.contains("kept in grace: [198.51.100.10]"),
        "{log}"
    );
    assert!(log.contains("grace ended"), "{log}");
    let dns_status = agent.status()["dns"].to_string();
    assert!(
        dns_status.contains("api.example.com -> [198.51.100.11]"),
        "{dns_status}"
    );
}

#[test]
fn enforcement_survives_an_agent_restart() {
    let world = World::new("restart");
    let _hosts = Hosts::new(&world);
    world.write_policy("db.yaml", &entry("db", "198.51.100.10", 5432));
    let mut agent = start(&world, &[]);
    check(&agent, "default", "tcp", "198.51.100.10", 5432, Allowed);

    agent.stop();
    // No agent: the pinned programs and maps still decide.
    check(&agent, "default", "tcp", "198.51.100.11", 5432, Denied);
    check(&agent, "default", "tcp", "198.51.100.10", 5432, Allowed);

    agent.restart();
    // The namespace's cgroup and the agent's own (exempt).
    assert!(agent.log().contains("adopted 2 cgroups"), "{}", agent.log());
    check(&agent, "default", "tcp", "198.51.100.11", 5432, Denied);
    check(&agent, "default", "tcp", "198.51.100.10", 5432, Allowed);
}

#[test]
fn exec_refuses_to_run_unenforced() {
    let world = World::new("noagent");
    let pin_root = format!("/sys/fs/bpf/enforcer-test-{}", world.id);
    let out = std::process::Command::new(ENFORCER)
        .args([
            "exec",
            "--namespace",
            "default",
            "--bpffs-root",
            &pin_root,
            "--cgroup-parent",
            &format!("enforcer-test-{}", world.id),
        ])
        .args(["--wait-ms", "200", "--", "true"])
        .output()
        .expect("running enforcer exec");
    let root = enforcer_user::cgroup::cgroup2_mount().expect("cgroup2");
    let _ = std::fs::remove_dir(root.join(format!("enforcer-test-{}/default", world.id)));
    let _ = std::fs::remove_dir(root.join(format!("enforcer-test-{}", world.id)));
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is the agent running?"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn unrelated_files_beside_the_mesh_config_do_not_trigger_reloads() {
    let world = World::new("quiet");
    let agent = start(&world, &[]);
    let reloads = || agent.log().matches("policy: ").count();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let before = reloads();
    // The agent's own log lives in this directory too: it must not feed back into reloads.
    for i in 0..5 {
        std::fs::write(world.dir.join(format!("notes-{i}.txt")), "x").expect("write");
        std::fs::write(world.policies.join(format!("README-{i}.md")), "x").expect("write");
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(reloads(), before, "{}", agent.log());
    // A policy file still does.
    world.write_policy("db.yaml", &entry("db", "198.51.100.10", 5432));
    agent.wait_for(std::time::Duration::from_secs(5), "a reload", || {
        reloads() > before
    });
}

#[test]
fn relative_paths_are_watched_too() {
    let world = World::new("relpath");
    let _hosts = Hosts::new(&world);
    registry_only(&world);
    let agent = Agent::start_with(
        &world,
        "policies".into(),
        &["--mesh-config", "mesh.yaml", "--namespace", "default"],
    );
    check(&agent, "default", "tcp", "198.51.100.10", 5432, Denied);
    world.write_policy("db.yaml", &entry("db", "198.51.100.10", 5432));
    agent.eventually("default", "tcp", "198.51.100.10", 5432, Allowed);
    std::fs::write(
        world.dir.join("mesh.yaml"),
        "outboundTrafficPolicy:\n  mode: ALLOW_ANY\n",
    )
    .expect("mesh");
    agent.eventually("default", "tcp", "198.51.100.11", 5432, Allowed);
}

#[test]
fn an_unreachable_dns_server_keeps_the_last_good_answer() {
    let world = World::new("dnsdown");
    let _hosts = Hosts::new(&world);
    let dns = Dns::new(&world, 1, &[("api.example.com", "198.51.100.10")]);
    world.write_policy(
        "api.yaml",
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api}\nspec:\n  hosts: [api.example.com]\n  ports: [{number: 443, name: https, protocol: HTTPS}]\n  resolution: DNS\n",
    );
    let agent = start(&world, &["--dns-server", &dns.addr(), "--dns-min-ttl", "1"]);
    check(&agent, "default", "tcp", "198.51.100.10", 443, Allowed);

    drop(dns);
    agent.wait_for(
        std::time::Duration::from_secs(10),
        "a resolver error",
        || agent.log().contains("keeping the last answer"),
    );
    check(&agent, "default", "tcp", "198.51.100.10", 443, Allowed);
    check(&agent, "default", "tcp", "198.51.100.11", 443, Denied);
}

#[test]
fn a_full_map_never_widens_what_is_allowed() {
    use crate::harness::Outcome;
    let world = World::new("full");
    let _hosts = Hosts::new(&world);
    // 5 addresses on 2 ports need 10 exact entries; the map holds 6.
    let hosts = [
        "198.51.100.10",
        "198.51.100.11",
        "198.51.100.12",
        "198.51.100.20",
        "198.51.100.21",
    ];
    let list: String = hosts.iter().map(|h| format!("  - {h}\n")).collect();
    world.write_policy(
        "many.yaml",
        &format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: many}}\nspec:\n  hosts: [many.example.com]\n  resolution: STATIC\n  ports: [{{number: 80, name: http}}, {{number: 443, name: https}}]\n  addresses:\n{list}"),
    );
    let agent = start(&world, &["--max-entries", "6"]);
    agent.wait_for(
        std::time::Duration::from_secs(5),
        "the map-full error",
        || agent.log().contains("fail closed"),
    );

    let (mut allowed, mut refused) = (0, 0);
    for host in hosts {
        for port in [80, 443] {
            match agent.probe("default", "tcp", host, port) {
                Outcome::Ok(_) => allowed += 1,
                Outcome::Eperm => refused += 1,
                other => panic!("{host}:{port}: {other:?}"),
            }
        }
    }
    assert_eq!(allowed + refused, 10);
    assert!(
        (1..=6).contains(&allowed),
        "what fitted is allowed, the rest refused: {allowed} allowed"
    );
    // Nothing outside the entry gains access, and REGISTRY_ONLY still holds.
    check(&agent, "default", "tcp", "203.0.113.30", 80, Denied);
    check(&agent, "default", "tcp", "198.51.100.10", 8080, Denied);

    // Never invisible: the status names the failure, and health fails once applies have kept
    // failing for longer than --max-age, although the loop runs.
    let status = agent.status();
    assert!(
        status["apply_errors"]
            .as_array()
            .is_some_and(|e| !e.is_empty()),
        "{status}"
    );
    // The metrics say which map and why, as the alerts read them.
    let text = agent.metrics();
    assert!(
        text.lines()
            .any(|l| l.starts_with("enforcer_apply_errors_total{")
                && l.contains("map=\"allow_exact\"")
                && l.contains("cause=\"full\"")),
        "{text}"
    );
    assert!(text.contains("enforcer_applies_failing 1"), "{text}");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let out = std::process::Command::new(crate::harness::ENFORCER)
        .args(["health", "--max-age", "1", "--status-file"])
        .arg(world.dir.join("status.json"))
        .output()
        .expect("enforcer health");
    assert_eq!(out.status.code(), Some(1), "health while every apply fails");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("applies have failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let live = std::process::Command::new(crate::harness::ENFORCER)
        .args(["health", "--max-age", "5", "--loop-only", "--status-file"])
        .arg(world.dir.join("status.json"))
        .output()
        .expect("enforcer health --loop-only");
    assert_eq!(live.status.code(), Some(0), "the loop itself runs");
}
