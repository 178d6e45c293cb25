use std::path::{Path, PathBuf};

use super::*;

const UID: &str = "8f1c2b3a-4d5e-6f70-8192-a3b4c5d6e7f8";

fn pod(rel: &str) -> Option<(String, Qos, Driver, PathBuf)> {
    pod_of(Path::new(rel))
}

#[test]
fn systemd_driver_paths_name_the_pod_at_every_depth() {
    let slice = UID.replace('-', "_");
    let burstable =
        format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{slice}.slice");
    let want = Some((
        UID.to_string(),
        Qos::Burstable,
        Driver::Systemd,
        PathBuf::from(&burstable),
    ));
    assert_eq!(pod(&burstable), want);
    for container in [
        "cri-containerd-0123abcd.scope",
        "crio-0123abcd.scope",
        "crio-conmon-0123abcd.scope",
        "docker-0123abcd.scope",
    ] {
        assert_eq!(
            pod(&format!("{burstable}/{container}")),
            want,
            "{container}"
        );
    }
    let besteffort = format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{slice}.slice/cri-containerd-1.scope");
    assert_eq!(pod(&besteffort).map(|p| p.1), Some(Qos::BestEffort));
    let guaranteed = format!("kubepods.slice/kubepods-pod{slice}.slice/crio-9.scope");
    let got = pod(&guaranteed).expect("guaranteed pod");
    assert_eq!(
        (got.1, got.3),
        (
            Qos::Guaranteed,
            PathBuf::from(format!("kubepods.slice/kubepods-pod{slice}.slice"))
        )
    );
}

#[test]
fn cgroupfs_driver_paths_name_the_pod_at_every_depth() {
    let burstable = format!("kubepods/burstable/pod{UID}");
    let want = Some((
        UID.to_string(),
        Qos::Burstable,
        Driver::Cgroupfs,
        PathBuf::from(&burstable),
    ));
    assert_eq!(pod(&burstable), want);
    assert_eq!(pod(&format!("{burstable}/0123456789abcdef")), want);
    assert_eq!(
        pod(&format!("kubepods/besteffort/pod{UID}/c1")).map(|p| p.1),
        Some(Qos::BestEffort)
    );
    assert_eq!(
        pod(&format!("kubepods/pod{UID}/c1")).map(|p| (p.1, p.3)),
        Some((Qos::Guaranteed, PathBuf::from(format!("kubepods/pod{UID}"))))
    );
}

#[test]
fn a_nested_kubelet_root_is_found() {
    // kind and --cgroup-root put the kubelet's tree below another cgroup; under systemd the
    // slices then carry their parents' names.
    let slice = UID.replace('-', "_");
    let rel = format!(
        "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{slice}.slice/cri-containerd-1.scope"
    );
    let got = pod(&rel).expect("nested systemd root");
    assert_eq!((got.0.as_str(), got.1), (UID, Qos::Burstable));
    assert!(got
        .3
        .ends_with(format!("kubelet-kubepods-burstable-pod{slice}.slice")));
    let rel = format!("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{slice}.slice");
    assert_eq!(pod(&rel).map(|p| p.1), Some(Qos::Guaranteed));
    let rel = format!("system.slice/containerd.service/kubepods/burstable/pod{UID}");
    assert_eq!(pod(&rel).map(|p| p.0), Some(UID.to_string()));
}

#[test]
fn other_cgroups_are_not_pods() {
    for rel in [
        "kubepods.slice",
        "kubepods.slice/kubepods-burstable.slice",
        "kubepods/burstable",
        "system.slice/kubelet.service",
        "user.slice/user-1000.slice",
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podnot_a_uid.slice",
        "kubepods/burstable/podshort",
        "kubepods/other/pod8f1c2b3a-4d5e-6f70-8192-a3b4c5d6e7f8",
        "kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod8f1c2b3a_4d5e_6f70_8192_a3b4c5d6e7f8.slice",
    ] {
        assert_eq!(pod(rel), None, "{rel}");
    }
}

#[test]
fn discover_finds_pods_of_both_drivers_in_a_tree() {
    let root = std::env::temp_dir().join(format!("enforcer-kubelet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let slice = UID.replace('-', "_");
    let other = "0a1b2c3d-0000-1111-2222-333344445555";
    let third = "ffffffff-0000-1111-2222-333344445555";
    for dir in [
        format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{slice}.slice/cri-containerd-1.scope"),
        "kubepods.slice/kubepods-besteffort.slice".to_string(),
        format!("kubepods/pod{other}/abc"),
        "system.slice/kubelet.service".to_string(),
        format!("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{}.slice", third.replace('-', "_")),
    ] {
        std::fs::create_dir_all(root.join(dir)).expect("making the tree");
    }
    let found = discover(&root);
    let _ = std::fs::remove_dir_all(&root);
    let summary: Vec<_> = found
        .values()
        .map(|p| (p.uid.as_str(), p.qos, p.driver))
        .collect();
    assert_eq!(
        summary,
        [
            (other, Qos::Guaranteed, Driver::Cgroupfs),
            (UID, Qos::Burstable, Driver::Systemd),
            (third, Qos::Guaranteed, Driver::Systemd),
        ]
    );
    assert!(found[UID]
        .path
        .ends_with(format!("kubepods-burstable-pod{slice}.slice")));
}

/// A static pod's uid as the kubelet sets it: its config hash, 32 lowercase hex digits.
const HASH: &str = "6e8e5c2b4f0a4b6e9a2f1c3d4e5f6a7b";

#[test]
fn static_pods_are_named_by_their_config_hash_under_both_drivers() {
    // As on a kubeadm control-plane node: etcd and kube-apiserver are Burstable static pods.
    let container =
        "cri-containerd-4c7a0f3e1b2d4c5a8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d.scope";
    let cases = [
        (
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{HASH}.slice/{container}"),
            Qos::Burstable,
            Driver::Systemd,
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{HASH}.slice"),
        ),
        (
            format!("kubepods.slice/kubepods-pod{HASH}.slice/{container}"),
            Qos::Guaranteed,
            Driver::Systemd,
            format!("kubepods.slice/kubepods-pod{HASH}.slice"),
        ),
        (
            format!("kubepods/burstable/pod{HASH}/4c7a0f3e1b2d"),
            Qos::Burstable,
            Driver::Cgroupfs,
            format!("kubepods/burstable/pod{HASH}"),
        ),
        (
            format!("kubepods/pod{HASH}"),
            Qos::Guaranteed,
            Driver::Cgroupfs,
            format!("kubepods/pod{HASH}"),
        ),
    ];
    for (rel, qos, driver, path) in cases {
        assert_eq!(
            pod(&rel),
            Some((HASH.to_string(), qos, driver, PathBuf::from(path))),
            "{rel}"
        );
    }
}

#[test]
fn almost_hashes_are_not_pods() {
    for uid in [
        &HASH[..31],
        &format!("{HASH}0"),
        &HASH.to_ascii_uppercase(),
        &format!("{}g", &HASH[..31]),
    ] {
        for rel in [
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice"),
            format!("kubepods/burstable/pod{uid}"),
        ] {
            assert_eq!(pod(&rel), None, "{rel}");
        }
    }
}

#[test]
fn discover_finds_static_pods() {
    let root = std::env::temp_dir().join(format!("enforcer-kubelet-static-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for dir in [
        format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{HASH}.slice/cri-containerd-1.scope"),
        format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice", UID.replace('-', "_")),
    ] {
        std::fs::create_dir_all(root.join(dir)).expect("making the tree");
    }
    let found = discover(&root);
    let _ = std::fs::remove_dir_all(&root);
    let uids: Vec<&str> = found.keys().map(String::as_str).collect();
    assert_eq!(uids, [HASH, UID]);
}
