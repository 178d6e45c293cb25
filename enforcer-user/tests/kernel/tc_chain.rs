//! The TC programs share a pod's veth with the CNI's: every program of the chain, before and
//! after enforcer's, TCX and legacy clsact alike, must still run, and enforcer's drop must
//! still happen. The CNI's programs are stood in for by two-instruction programs that pass
//! (`r0 = -1; exit`: TCX_NEXT / TC_ACT_UNSPEC), counted with the kernel's BPF statistics.

use std::{
    ffi::CString,
    os::fd::{FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
};

use aya::programs::{tc::TcAttachOptions, LinkOrder, ProgramInfo, SchedClassifier, TcAttachType};

use crate::{
    harness::{start_with_pods, Hosts, World},
    pod::Pod,
};

const POD_CIDR: &str = "203.0.113.128/26";

const SHOP: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  addresses: [198.51.100.10]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
"#;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

/// A sched_cls program that passes everything to the next one, pinned at `pin`.
fn pass_program(name: &str, pin: &Path) -> OwnedFd {
    // mov64 r0, -1; exit
    let insns: [u8; 16] = [
        0xb7, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x95, 0, 0, 0, 0, 0, 0, 0,
    ];
    let license = b"GPL\0";
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SCHED_CLS.to_ne_bytes());
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    let n = name.len().min(15);
    attr[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: attr is a bpf_attr for BPF_PROG_LOAD, its pointers outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, attr.as_ptr(), attr.len()) };
    assert!(
        fd >= 0,
        "loading {name}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel just returned this descriptor to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path = CString::new(pin.as_os_str().as_encoded_bytes()).expect("pin path");
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(std::os::fd::AsRawFd::as_raw_fd(&fd) as u32).to_ne_bytes());
    // SAFETY: attr is a bpf_attr for BPF_OBJ_PIN; the path outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, attr.as_ptr(), attr.len()) };
    assert_eq!(rc, 0, "pinning {name}: {}", std::io::Error::last_os_error());
    fd
}

fn runs(pin: &Path) -> u64 {
    ProgramInfo::from_pin(pin)
        .ok()
        .map(|i| i.run_count())
        .unwrap_or(0)
}

/// Removes the test's own pins (the agent's go with its teardown).
struct Pins(Vec<PathBuf>);

impl Drop for Pins {
    fn drop(&mut self) {
        for pin in &self.0 {
            let _ = std::fs::remove_file(pin);
        }
    }
}

#[test]
fn every_program_on_the_veth_still_runs_and_the_drop_still_happens() {
    let world = World::new("tcchain");
    let hosts = Hosts::new(&world);
    let shop = ["--namespace", "shop"];
    let agent = start_with_pods(&world, &hosts, ("shop.yaml", SHOP), &[POD_CIDR], &shop);
    let netns = world.netns("enfc");
    let pod = Pod::idle(&agent, "shop", &netns);
    let host_if = pod.host_if();
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF statistics");

    // What a CNI would have there: TCX programs in front of and behind enforcer's (attached
    // after it, as a CNI restarting later would), and a legacy clsact filter.
    let pins = Pins(
        ["front", "back", "back_reply", "legacy"]
            .iter()
            .map(|n| PathBuf::from(&agent.pin_root).join(format!("test_{n}")))
            .collect(),
    );
    let mut links = Vec::new();
    for (pin, direction, order) in [
        (&pins.0[0], TcAttachType::Ingress, LinkOrder::first()),
        (&pins.0[1], TcAttachType::Ingress, LinkOrder::last()),
        (&pins.0[2], TcAttachType::Egress, LinkOrder::last()),
    ] {
        let name = pin.file_name().and_then(|n| n.to_str()).unwrap_or("test");
        let _fd = pass_program(name, pin);
        let mut prog = SchedClassifier::from_pin(pin).expect("the pinned program");
        links.push(
            prog.attach_with_options(&host_if, direction, TcAttachOptions::TcxOrder(order))
                .expect("attaching a TCX program"),
        );
        std::mem::forget(prog); // the link holds the program; detached with the veth
    }
    let _fd = pass_program("test_legacy", &pins.0[3]);
    let _ = Command::new("tc")
        .args(["qdisc", "add", "dev", &host_if, "clsact"])
        .status();
    let status = Command::new("tc")
        .args([
            "filter",
            "add",
            "dev",
            &host_if,
            "ingress",
            "prio",
            "100",
            "bpf",
            "da",
            "object-pinned",
        ])
        .arg(&pins.0[3])
        .status()
        .expect("tc");
    assert!(status.success(), "adding the legacy filter");

    let judge = PathBuf::from(&agent.pin_root).join("programs/enforcer_tc");
    let reply = PathBuf::from(&agent.pin_root).join("programs/enforcer_reply");
    let counted = [
        &pins.0[0], &pins.0[1], &pins.0[2], &pins.0[3], &judge, &reply,
    ];
    let before: Vec<u64> = counted.iter().map(|p| runs(p)).collect();
    // Outside the pod's cgroup: only TC stands in the way.
    assert!(
        pod.probe_unmapped("tcp", "198.51.100.10", 443),
        "the registered host through the whole chain\n{}",
        agent.log()
    );
    let after: Vec<u64> = counted.iter().map(|p| runs(p)).collect();
    let names = [
        "front",
        "back",
        "back (egress)",
        "legacy clsact",
        "enforcer_tc",
        "enforcer_reply",
    ];
    for ((name, b), a) in names.iter().zip(&before).zip(&after) {
        assert!(a > b, "{name} did not run: {b} -> {a} runs");
    }
    assert!(
        !pod.probe_unmapped("tcp", "198.51.100.11", 443),
        "an unregistered host is still dropped"
    );
    // Checked where it counts: the hosts' own log.
    assert!(
        hosts.reached("198.51.100.10", 443, &pod.ip),
        "{:?}",
        hosts.received()
    );
    assert!(
        !hosts.reached("198.51.100.11", 443, &pod.ip),
        "{:?}",
        hosts.received()
    );
    agent.wait_for(
        std::time::Duration::from_secs(5),
        "the drop's record",
        || {
            agent
                .denials()
                .iter()
                .any(|d| d["hook"] == "tc" && d["dst"] == "198.51.100.11")
        },
    );
    drop(links);
    drop(pod);
}
