use std::collections::BTreeMap;

use enforcer_common::{mode, proto, CgroupScope, PolicyKey};

use super::*;

const SHOP: CgroupScope = CgroupScope {
    scope: 7,
    mode: mode::REGISTRY_ONLY,
};

fn dst(p: u8, ip: &str, port: u16) -> Destination {
    Destination {
        proto: p,
        addr: ip.parse().unwrap(),
        port,
    }
}

fn allow(plan: &mut MapPlan, scope: u32, p: u8, ip: &str, port: u16) {
    plan.exact.insert(PolicyKey {
        scope,
        port,
        proto: p,
        pad: 0,
        addr: key_bytes(ip.parse().unwrap()),
    });
}

#[test]
fn judges_a_claimed_cgroup_by_its_scope_and_mode() {
    let mut plan = MapPlan::default();
    plan.cgroups.insert(100, SHOP);
    allow(&mut plan, 7, proto::TCP, "198.51.100.10", 443);
    let none = Hierarchy::default();
    let api = dst(proto::TCP, "198.51.100.10", 443);
    assert_eq!(judge(&plan, &none, 100, api), Verdict::Pass);
    assert_eq!(
        judge(&plan, &none, 100, dst(proto::UDP, "198.51.100.10", 443)),
        Verdict::Refuse
    );
    assert_eq!(judge(&plan, &none, 999, api), Verdict::Pass, "unclaimed");

    plan.exact.clear();
    assert_eq!(judge(&plan, &none, 100, api), Verdict::Refuse);
    plan.cgroups.insert(
        100,
        CgroupScope {
            mode: mode::AUDIT,
            ..SHOP
        },
    );
    assert_eq!(judge(&plan, &none, 100, api), Verdict::Audit);
    plan.cgroups.insert(
        100,
        CgroupScope {
            mode: mode::ALLOW_ANY,
            ..SHOP
        },
    );
    assert_eq!(
        judge(&plan, &none, 100, api),
        Verdict::Pass,
        "never revoked"
    );
}

#[test]
fn acts_only_where_the_new_maps_refuse_what_the_old_let_pass() {
    use Verdict::*;
    assert_eq!(action(Pass, Refuse), Some(Action::Destroy));
    assert_eq!(
        action(Audit, Refuse),
        Some(Action::Destroy),
        "AUDIT to REGISTRY_ONLY"
    );
    assert_eq!(action(Pass, Audit), Some(Action::Report));
    assert_eq!(
        action(Refuse, Refuse),
        None,
        "never opened through these maps"
    );
    assert_eq!(action(Audit, Audit), None, "reported when it connected");
    assert_eq!(action(Pass, Pass), None);
    assert_eq!(action(Refuse, Pass), None);
}

/// root(1) -> kubepods(2) -> pod(3) -> container(4) -> nested(5); 6 is elsewhere.
fn tree() -> Hierarchy {
    Hierarchy::from_parents(BTreeMap::from([(2, 1), (3, 2), (4, 3), (5, 4), (6, 1)]))
}

#[test]
fn the_deepest_claimed_ancestor_decides() {
    let unmapped = CgroupScope {
        scope: 1,
        mode: mode::REGISTRY_ONLY,
    };
    let mut plan = MapPlan::default();
    plan.trees.insert(2, unmapped);
    plan.trees.insert(3, SHOP);
    let h = tree();
    assert_eq!(scope_of(&plan, &h, 5), Some(SHOP));
    assert_eq!(scope_of(&plan, &h, 4), Some(SHOP));
    assert_eq!(
        scope_of(&plan, &h, 3),
        Some(SHOP),
        "a claimed cgroup itself"
    );
    assert_eq!(scope_of(&plan, &h, 2), Some(unmapped));
    assert_eq!(scope_of(&plan, &h, 6), None);
    assert_eq!(scope_of(&plan, &h, 99), None, "unknown to the hierarchy");
    // An exact entry wins over any tree.
    let agent = CgroupScope {
        scope: 9,
        mode: mode::ALLOW_ANY,
    };
    plan.cgroups.insert(5, agent);
    assert_eq!(scope_of(&plan, &h, 5), Some(agent));
    // Without trees the hierarchy is not consulted (local mode).
    plan.trees.clear();
    assert_eq!(scope_of(&plan, &h, 4), None);
}

#[test]
fn claims_below_the_deepest_level_searched_are_not_seen() {
    // A chain 1 -> 2 -> ... -> 40: level n is cgroup n + 1.
    let parents = (2..=40).map(|id| (id, id - 1)).collect();
    let h = Hierarchy::from_parents(parents);
    let mut plan = MapPlan::default();
    plan.trees.insert(26, SHOP); // level 25
    assert_eq!(scope_of(&plan, &h, 40), None);
    plan.trees.insert(25, SHOP); // level 24
    assert_eq!(scope_of(&plan, &h, 40), Some(SHOP));
}

#[test]
fn reads_the_hierarchy_of_a_directory_tree() {
    let dir = std::env::temp_dir().join(format!("enforcer-revoke-{}", std::process::id()));
    let deep = dir.join("a/b");
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::create_dir_all(dir.join("c")).unwrap();
    let h = Hierarchy::read(&dir).unwrap();
    let id = |p: &Path| crate::cgroup::cgroup_id(p).unwrap();
    assert_eq!(h.levels(id(&deep)), [id(&dir.join("a")), id(&deep)]);
    assert_eq!(h.levels(id(&dir.join("c"))), [id(&dir.join("c"))]);
    std::fs::remove_dir_all(&dir).unwrap();
}
