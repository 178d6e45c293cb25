//! Finding a pod's host-side veth the way Kubernetes mode does, on real interfaces laid out as a
//! routed CNI (Calico-style: a host route per pod) and as a bridge CNI (the bridge plugin) would,
//! and the TC links Kubernetes mode keeps on them (`PodLinks` over a datapath of its own).

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
};

use enforcer_user::{
    datapath::{self, Datapath},
    k8s::pod_links::{PodLinks, PodNet},
    veth::{host_side, ifindex, Found},
};

use crate::harness::World;

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Network namespaces and links made here, removed on drop.
pub struct Made {
    pub netns: Vec<String>,
    pub links: Vec<String>,
}

impl Drop for Made {
    fn drop(&mut self) {
        for link in &self.links {
            let _ = Command::new("ip").args(["link", "del", link]).output();
        }
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A pod namespace with `eth0` holding `addr`, joined to the host by `host_if`.
pub fn pod(made: &mut Made, netns: &str, host_if: &str, addr: &str) {
    made.netns.push(netns.to_string());
    made.links.push(host_if.to_string());
    ip(&["netns", "add", netns]);
    ip(&[
        "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", netns,
    ]);
    ip(&["-n", netns, "addr", "add", addr, "dev", "eth0"]);
    ip(&["-n", netns, "link", "set", "eth0", "up"]);
    ip(&["link", "set", host_if, "up"]);
}

#[test]
fn the_host_side_veth_is_found_for_routed_and_bridged_pods() {
    let world = World::new("veth");
    let tag = &world.id[world.id.len().saturating_sub(6)..];
    let mut made = Made {
        netns: Vec::new(),
        links: Vec::new(),
    };

    // Routed: the host has a /32 route to the pod through its veth.
    let (routed_ns, routed_if) = (format!("enfvr-{tag}"), format!("evr{tag}"));
    pod(&mut made, &routed_ns, &routed_if, "203.0.113.170/32");
    ip(&["route", "add", "203.0.113.170/32", "dev", &routed_if]);
    let routed: IpAddr = "203.0.113.170".parse().expect("address");
    assert_eq!(
        host_side(routed, None).expect("routed pod"),
        Found::Route(routed_if.clone())
    );

    // Bridged: the route leads to the bridge; the pod's namespace names the peer.
    let (bridged_ns, bridged_if, bridge) = (
        format!("enfvb-{tag}"),
        format!("evb{tag}"),
        format!("ebr{tag}"),
    );
    made.links.push(bridge.clone());
    ip(&["link", "add", &bridge, "type", "bridge"]);
    ip(&["addr", "add", "203.0.113.177/29", "dev", &bridge]);
    ip(&["link", "set", &bridge, "up"]);
    pod(&mut made, &bridged_ns, &bridged_if, "203.0.113.178/29");
    ip(&["link", "set", &bridged_if, "master", &bridge]);
    let bridged: IpAddr = "203.0.113.178".parse().expect("address");
    let netns = Path::new("/var/run/netns").join(&bridged_ns);
    assert_eq!(
        host_side(bridged, Some(&netns)).expect("bridged pod"),
        Found::Peer(bridged_if.clone())
    );
    // Without the namespace the route alone cannot tell, and says so.
    let err = host_side(bridged, None).expect_err("a bridge is not the pod's veth");
    assert!(
        err.to_string().contains("does not lead to a veth"),
        "{err:#}"
    );
    // A namespace that does not hold the address is not taken for the pod's.
    let wrong = Path::new("/var/run/netns").join(&routed_ns);
    let err = host_side(bridged, Some(&wrong)).expect_err("wrong namespace");
    assert!(err.to_string().contains("holds 203.0.113.178"), "{err:#}");
}

/// Cilium without endpoint routes: every pod's route names `cilium_host`, a veth whose peer
/// (`cilium_net`) is on the host too. Pod egress never crosses it, so it is no pod's veth.
#[test]
fn a_veth_whose_peer_is_on_the_host_is_no_pods_veth() {
    let world = World::new("vethh");
    let tag = &world.id[world.id.len().saturating_sub(6)..];
    let mut made = Made {
        netns: Vec::new(),
        links: Vec::new(),
    };
    let (host, net) = (format!("evh{tag}"), format!("evn{tag}"));
    made.links.push(host.clone());
    ip(&["link", "add", &host, "type", "veth", "peer", "name", &net]);
    ip(&["link", "set", &host, "up"]);
    ip(&["link", "set", &net, "up"]);
    ip(&["route", "add", "203.0.113.160/32", "dev", &host]);
    let pod: IpAddr = "203.0.113.160".parse().expect("address");
    let got = host_side(pod, None);
    let err = got.expect_err("a veth with its peer on the host is not a pod's");
    assert!(
        err.to_string().contains("does not lead to a veth"),
        "{err:#}"
    );
}

/// A datapath of the test's own, driven as Kubernetes mode drives it: pins under a test bpffs
/// directory, the cgroup programs on an empty test cgroup. Torn down on drop.
struct TestDatapath {
    dp: Option<Datapath>,
    pin_root: PathBuf,
    cgroup: PathBuf,
}

impl TestDatapath {
    fn open(world: &World) -> Self {
        let pin_root = PathBuf::from(format!("/sys/fs/bpf/enforcer-test-{}", world.id));
        let mount = enforcer_user::cgroup::cgroup2_mount().expect("cgroup2 mount");
        let cgroup = mount.join(format!("enforcer-test-{}-links", world.id));
        fs::create_dir_all(&cgroup).expect("a test cgroup");
        let opts = datapath::Options {
            pin_root: pin_root.clone(),
            cgroup_root: cgroup.clone(),
            max_exact: 64,
            max_cidr: 64,
            max_scopes: 16,
            max_learned: 64,
        };
        let mut this = Self {
            dp: None,
            pin_root,
            cgroup,
        };
        let (dp, _events) = Datapath::open(&opts).expect("opening the datapath");
        this.dp = Some(dp);
        this
    }

    fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().expect("open")
    }

    fn reconcile(&mut self, links: &mut PodLinks, pods: &[PodNet]) {
        let pin_root = self.pin_root.clone();
        links.reconcile(self.dp(), &pin_root, pods, None);
    }

    /// Whether both TC pins of `ifname` are there.
    fn pinned(&self, ifname: &str) -> bool {
        let links = self.pin_root.join("links");
        [format!("tc_{ifname}"), format!("tc_{ifname}_reply")]
            .iter()
            .all(|pin| links.join(pin).exists())
    }

    /// Whether neither TC pin of `ifname` is there.
    fn unpinned(&self, ifname: &str) -> bool {
        let links = self.pin_root.join("links");
        [format!("tc_{ifname}"), format!("tc_{ifname}_reply")]
            .iter()
            .all(|pin| !links.join(pin).exists())
    }
}

impl Drop for TestDatapath {
    fn drop(&mut self) {
        drop(self.dp.take());
        if let Err(err) = datapath::teardown(&self.pin_root) {
            eprintln!("tearing down {}: {err:#}", self.pin_root.display());
        }
        let _ = fs::remove_dir(&self.cgroup);
    }
}

/// A routed pod: its own namespace, and a host route to its /32 through `host_if`.
fn routed_pod(made: &mut Made, netns: &str, host_if: &str, addr: &str) {
    pod(made, netns, host_if, &format!("{addr}/32"));
    ip(&["route", "add", &format!("{addr}/32"), "dev", host_if]);
}

/// An `unreachable` route, removed on drop.
struct Unreachable(String);

impl Unreachable {
    fn add(dst: &str) -> Self {
        ip(&["route", "add", "unreachable", dst]);
        Self(dst.to_string())
    }
}

impl Drop for Unreachable {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["route", "del", "unreachable", &self.0])
            .output();
    }
}

fn pod_net(key: &str, addr: &str) -> PodNet {
    PodNet {
        key: key.to_string(),
        ips: vec![addr.parse().expect("address")],
        cgroup: None,
    }
}

/// Two pods whose routes lead to the same veth: only the first gets the TC programs, the other
/// is reported; once the first goes, the second gets them (its pins are not the first's).
#[test]
fn one_veth_is_one_pods() {
    let world = World::new("veth1");
    let tag = &world.id[world.id.len().saturating_sub(6)..];
    let mut made = Made {
        netns: Vec::new(),
        links: Vec::new(),
    };
    let (netns, host_if) = (format!("enfv1-{tag}"), format!("ev1{tag}"));
    routed_pod(&mut made, &netns, &host_if, "203.0.113.161");
    ip(&["route", "add", "203.0.113.162/32", "dev", &host_if]);
    let mut dp = TestDatapath::open(&world);
    let mut links = PodLinks::default();
    let pods = [
        pod_net("shop/a/uid-a", "203.0.113.161"),
        pod_net("shop/b/uid-b", "203.0.113.162"),
    ];
    let (a, b) = (&pods[0], &pods[1]);

    dp.reconcile(&mut links, &pods);
    assert!(dp.pinned(&host_if), "the first pod's links");
    assert_eq!(links.pending(), 1, "the second pod is not enforced by TC");
    let why = links.failure(&b.key).unwrap_or_default();
    assert!(
        why.contains(&host_if) && why.contains(&a.key),
        "the reason names the interface and the pod that has it: {why}"
    );

    dp.reconcile(&mut links, &pods[1..]);
    assert!(dp.pinned(&host_if), "the second pod's links, now");
    assert_eq!(links.pending(), 0);

    dp.reconcile(&mut links, &[]);
    assert!(dp.unpinned(&host_if), "the second pod's links go with it");
}

/// A pod's veth is deleted and another pod's veth gets its name (Calico names them after the
/// pod's name, so a StatefulSet's next pod does): the first pod's going leaves the second's
/// links alone.
#[test]
fn a_reused_interface_name_keeps_the_new_pods_links() {
    let world = World::new("vethr");
    let tag = &world.id[world.id.len().saturating_sub(6)..];
    let mut made = Made {
        netns: Vec::new(),
        links: Vec::new(),
    };
    let host_if = format!("evr{tag}");
    let (ns_a, ns_b) = (format!("enfra-{tag}"), format!("enfrb-{tag}"));
    routed_pod(&mut made, &ns_a, &host_if, "203.0.113.163");
    let mut dp = TestDatapath::open(&world);
    let mut links = PodLinks::default();
    let pods = [
        pod_net("shop/web-0/uid-a", "203.0.113.163"),
        pod_net("shop/web-0/uid-b", "203.0.113.164"),
    ];
    dp.reconcile(&mut links, &pods[..1]);
    assert!(dp.pinned(&host_if), "the first pod's links");
    let first = ifindex(&host_if).expect("lookup").expect("the first veth");

    ip(&["link", "del", &host_if]);
    // Where the first pod's address leads now is no pod's veth (not another test's either).
    let _unreachable = Unreachable::add("203.0.113.163/32");
    routed_pod(&mut made, &ns_b, &host_if, "203.0.113.164");
    // The API server still lists the first pod for a moment.
    dp.reconcile(&mut links, &pods);
    assert!(dp.pinned(&host_if), "the second pod's links");
    dp.reconcile(&mut links, &pods[1..]);
    assert!(
        dp.pinned(&host_if),
        "the first pod took the second pod's links along"
    );

    // Forgetting the first interface's links, whatever the order, leaves the second's.
    let second = ifindex(&host_if).expect("lookup").expect("the second veth");
    assert_ne!(first, second);
    let pin_root = dp.pin_root.clone();
    dp.dp().forget_tc_of(&host_if, first, &pin_root);
    assert!(dp.pinned(&host_if), "pins of another interface's links");
    dp.dp().forget_tc_of(&host_if, second, &pin_root);
    assert!(dp.unpinned(&host_if), "pins of this interface's links");
}

/// Pins of pods that went while the agent was down (their veths with them) are removed by the
/// next agent's first reconcile; pins of veths that are still there are left.
#[test]
fn pins_of_veths_gone_while_the_agent_was_down_are_removed() {
    let world = World::new("veths");
    let tag = &world.id[world.id.len().saturating_sub(6)..];
    let mut made = Made {
        netns: Vec::new(),
        links: Vec::new(),
    };
    let (gone_ns, gone_if) = (format!("enfsg-{tag}"), format!("esg{tag}"));
    let (kept_ns, kept_if) = (format!("enfsk-{tag}"), format!("esk{tag}"));
    routed_pod(&mut made, &gone_ns, &gone_if, "203.0.113.165");
    routed_pod(&mut made, &kept_ns, &kept_if, "203.0.113.166");
    let mut dp = TestDatapath::open(&world);
    let mut before = PodLinks::default();
    dp.reconcile(
        &mut before,
        &[
            pod_net("shop/gone/uid-g", "203.0.113.165"),
            pod_net("shop/kept/uid-k", "203.0.113.166"),
        ],
    );
    assert!(dp.pinned(&gone_if) && dp.pinned(&kept_if));

    // The agent stops; a pod and its veth go meanwhile; the next agent starts.
    drop(before);
    ip(&["link", "del", &gone_if]);
    let mut after = PodLinks::default();
    dp.reconcile(&mut after, &[]);
    assert!(dp.unpinned(&gone_if), "the stale pins");
    assert!(dp.pinned(&kept_if), "pins of a veth that is still there");
}

/// A process of a pod, in the pod's network namespace and a container cgroup under the pod's;
/// killed, and its cgroups removed, on drop.
struct PodProcess {
    child: std::process::Child,
    pod_cgroup: PathBuf,
}

impl PodProcess {
    fn start(world: &World, netns: &str) -> Self {
        let mount = enforcer_user::cgroup::cgroup2_mount().expect("cgroup2 mount");
        let pod_cgroup = mount
            .join(format!("enforcer-test-{}-pods", world.id))
            .join(format!("pod{}", world.id));
        let ctr = pod_cgroup.join("ctr");
        fs::create_dir_all(&ctr).expect("the pod's cgroups");
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec ip netns exec "$1" sleep 60"#)
            .arg(&ctr)
            .arg(netns)
            .spawn()
            .expect("a process in the pod");
        let this = Self { child, pod_cgroup };
        let procs = ctr.join("cgroup.procs");
        for _ in 0..100 {
            if fs::read_to_string(&procs).is_ok_and(|p| !p.trim().is_empty()) {
                return this;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("the pod's process never joined {}", ctr.display());
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir(self.pod_cgroup.join("ctr"));
        let _ = fs::remove_dir(&self.pod_cgroup);
        if let Some(parent) = self.pod_cgroup.parent() {
            let _ = fs::remove_dir(parent);
        }
    }
}

/// Behind a bridge the route does not tell: the pod's veth is found through the network
/// namespace of a process in its cgroup, held open while it is read.
#[test]
fn a_bridged_pod_is_found_through_its_process() {
    let world = World::new("vethb");
    let tag = &world.id[world.id.len().saturating_sub(6)..];
    let mut made = Made {
        netns: Vec::new(),
        links: Vec::new(),
    };
    let (netns, host_if, bridge) = (
        format!("enfvb-{tag}"),
        format!("evb{tag}"),
        format!("ebr{tag}"),
    );
    made.links.push(bridge.clone());
    ip(&["link", "add", &bridge, "type", "bridge"]);
    ip(&["addr", "add", "203.0.113.177/29", "dev", &bridge]);
    ip(&["link", "set", &bridge, "up"]);
    pod(&mut made, &netns, &host_if, "203.0.113.178/29");
    ip(&["link", "set", &host_if, "master", &bridge]);
    let process = PodProcess::start(&world, &netns);
    let mut dp = TestDatapath::open(&world);
    let mut links = PodLinks::default();
    let mut web = pod_net("shop/web/uid-w", "203.0.113.178");
    web.cgroup = Some(process.pod_cgroup.clone());

    let pin_root = dp.pin_root.clone();
    links.reconcile(dp.dp(), &pin_root, &[web], Some(Path::new("/proc")));
    assert_eq!(links.pending(), 0, "{:?}", links.failure("shop/web/uid-w"));
    assert!(dp.pinned(&host_if), "the links on the pod's veth");
}
