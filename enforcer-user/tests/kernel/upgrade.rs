//! An upgrade that changes a map's shape: the new agent must not adopt the pinned map blind,
//! and the move to new maps must leave no moment unenforced.

use std::{
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use enforcer_testkit::{cgroups::in_cgroup, python, script};

use crate::harness::{check, outcome, registry_only, Agent, Hosts, Outcome, Want::*, World};

const SHOP: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  addresses: [198.51.100.10]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
"#;

fn map_shape(pin: &Path) -> (u64, u64) {
    let out = Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(pin)
        .output()
        .expect("bpftool");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    (
        info["bytes_value"].as_u64().unwrap_or(0),
        info["max_entries"].as_u64().unwrap_or(0),
    )
}

#[test]
fn pinned_maps_of_another_shape_are_replaced_with_no_gap() {
    let world = World::new("upgrade");
    let _hosts = Hosts::new(&world);
    world.write_policy("shop.yaml", SHOP);
    let mesh = registry_only(&world);
    let args = ["--mesh-config", &mesh, "--namespace", "shop"];
    let mut old = Agent::start(&world, &[&args[..], &["--max-entries", "1000"]].concat());
    check(&old, "shop", "tcp", "198.51.100.11", 80, Denied);
    old.stop();

    // What an older release might have pinned: a cgroup map whose values were 16 bytes.
    let maps = Path::new(&old.pin_root).join("maps");
    let cgroups = maps.join("ENF_CGROUPS");
    std::fs::remove_file(&cgroups).expect("unpinning the cgroup map");
    let made = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&cgroups)
        .args([
            "type",
            "hash",
            "key",
            "8",
            "value",
            "16",
            "entries",
            "1024",
            "name",
            "ENF_CGROUPS",
        ])
        .status()
        .expect("bpftool");
    assert!(made.success(), "creating a map of the old shape");

    // Probes run all through the new agent's start: not one may pass.
    let stop = Arc::new(AtomicBool::new(false));
    let shop = enforcer_user::cgroup::cgroup2_mount()
        .expect("cgroup2")
        .join(&old.cgroup_parent)
        .join("shop");
    let watcher = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..200 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                // Straight into the namespace's cgroup: `enforcer exec` reads the pinned maps,
                // which are being replaced.
                let out = in_cgroup(&shop, python())
                    .arg(script("probe.py"))
                    .args(["tcp", "198.51.100.11", "80", "1"])
                    .output()
                    .expect("probe");
                seen.push(outcome(&out));
            }
            seen
        })
    };
    let new = Agent::start(&world, &args);
    check(&new, "shop", "tcp", "198.51.100.10", 80, Allowed);
    check(&new, "shop", "tcp", "198.51.100.11", 80, Denied);
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.join().expect("the probe thread");
    assert!(
        !seen.iter().any(|o| matches!(o, Outcome::Ok(_))),
        "a refused connection passed during the migration: {seen:?}\n{}",
        new.log()
    );
    assert_eq!(
        map_shape(&cgroups).0,
        8,
        "the cgroup map has this version's shape"
    );
    assert_eq!(
        map_shape(&maps.join("ENF_ALLOW_EXACT")).1,
        131_072,
        "a changed --max-entries takes effect"
    );
    assert!(!Path::new(&new.pin_root).join("maps_next").exists());
    assert!(new.log().contains("migrated to new maps"), "{}", new.log());
}
