//! Kubernetes mode under load, through testkit's fake API server and a fake kubelet tree:
//!
//! - 2,000 Services with 10 endpoints each while EndpointSlices change 100 times a second for
//!   30 s: ServiceEntry change to kernel (p50, p99), a new pod's unmapped window (p50, p99),
//!   the agent's CPU and peak RSS;
//! - 10,000 Services with 10 endpoints and `defaultServiceExportTo: ['*']`: map occupancy, RSS;
//! - the connect4 cost per run from a pod's container cgroup (the ancestor walk), to set beside
//!   local mode's figure above.
//!
//! Latencies are read off the pinned maps, polled every 100 µs.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use aya::maps::{HashMap, Map, MapData};
use enforcer_common::{ipv4_mapped, map_names, proto, CgroupScope, PolicyKey, ScopeName};
use enforcer_testkit::{
    apiserver::FakeApiServer,
    cgroups::{cgroup2_mount, in_cgroup, remove_tree},
};
use serde_json::{json, Value};

use crate::{bench, sh};

const PIN_ROOT: &str = "/sys/fs/bpf/enforcer-bench-k8s";
const CGROUP_PARENT: &str = "enforcer-bench-k8s";
const KUBELET: &str = "enforcer-bench-k8s-kubelet";
const CHURN: Duration = Duration::from_secs(30);
const CHURN_PER_SECOND: u32 = 100;
const ENDPOINTS: usize = 10;

struct Agent {
    child: Child,
    work: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn run(bin: &Path) -> anyhow::Result<()> {
    let cgroup2 = cgroup2_mount()?;
    let kubelet = cgroup2.join(KUBELET);
    cleanup(bin, &kubelet);
    let result = measure(bin, &kubelet);
    cleanup(bin, &kubelet);
    result
}

fn measure(bin: &Path, kubelet: &Path) -> anyhow::Result<()> {
    println!("\nKubernetes mode (fake API server, fake kubelet tree; `--kubernetes`):");
    let work = std::env::temp_dir().join("enforcer-bench-k8s");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    churn(bin, &work, kubelet)?;
    // Endpoints are in the registry only for headless Services, or for all with --socket-lb.
    for extra in [&[][..], &["--socket-lb"][..]] {
        cleanup(bin, kubelet);
        occupancy(bin, &work, kubelet, 10_000, extra)?;
    }
    Ok(())
}

/// The churn part: 2,000 Services, EndpointSlices updated 100 times a second.
fn churn(bin: &Path, work: &Path, kubelet: &Path) -> anyhow::Result<()> {
    let server = cluster(2_000, None)?;
    let agent = start_agent(bin, work, &server, kubelet, &[])?;
    let web = pod(&server, kubelet, "web", 0)?;
    let scope = scope_id("shop", Duration::from_secs(30))?;
    let exact: HashMap<MapData, PolicyKey, u32> = pinned_hash(map_names::ALLOW_EXACT)?;
    let trees: HashMap<MapData, u64, CgroupScope> = pinned_hash(map_names::CG_TREES)?;

    let stop = AtomicBool::new(false);
    let updates = AtomicU64::new(0);
    let cpu_before = cpu_seconds(agent.child.id());
    let started = Instant::now();
    let (changes, windows) = std::thread::scope(|s| {
        s.spawn(|| slice_churn(&server, 2_000, &stop, &updates));
        let mut changes = Vec::new();
        let mut windows = Vec::new();
        let mut n = 0u32;
        while started.elapsed() + Duration::from_secs(2) < CHURN {
            n += 1;
            match entry_round(&server, &exact, scope, n) {
                Ok(ms) => changes.extend(ms),
                Err(err) => eprintln!("  change {n}: {err:#}"),
            }
            match pod_round(&server, kubelet, &trees, n) {
                Ok(ms) => windows.push(ms),
                Err(err) => eprintln!("  pod {n}: {err:#}"),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        stop.store(true, Ordering::Relaxed);
        (changes, windows)
    });
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(agent.child.id()) - cpu_before;
    println!(
        "  2,000 Services x {ENDPOINTS} endpoints, {} EndpointSlice updates in {elapsed:.1} s ({:.0}/s):",
        updates.load(Ordering::Relaxed),
        updates.load(Ordering::Relaxed) as f64 / elapsed
    );
    print_percentiles("ServiceEntry change to kernel", &changes);
    print_percentiles("new pod's unmapped window", &windows);
    println!(
        "    agent CPU {:.1}% of one core, peak RSS {:.1} MiB",
        100.0 * cpu / elapsed,
        bench::rss_kib(agent.child.id(), "VmHWM:") as f64 / 1024.0
    );
    walk_cost(&web)?;
    drop(agent);
    Ok(())
}

/// The occupancy part: `services` Services exported everywhere, the agent run with `extra`.
fn occupancy(
    bin: &Path,
    work: &Path,
    kubelet: &Path,
    services: usize,
    extra: &[&str],
) -> anyhow::Result<()> {
    let server = cluster(services, Some("'*'"))?;
    let started = Instant::now();
    let agent = start_agent(bin, work, &server, kubelet, extra)?;
    let ready = started.elapsed();
    pod(&server, kubelet, "web", 0)?;
    std::thread::sleep(Duration::from_secs(2));
    let exact: HashMap<MapData, PolicyKey, u32> = pinned_hash(map_names::ALLOW_EXACT)?;
    let entries = exact.keys().filter_map(Result::ok).count();
    println!(
        "  {services} Services x {ENDPOINTS} endpoints, defaultServiceExportTo ['*'], {}: first apply {:.1} s, {entries} exact entries on this node, peak RSS {:.1} MiB, {:.1} MiB after",
        if extra.is_empty() { "cluster IPs" } else { "--socket-lb" },
        ready.as_secs_f64(),
        bench::rss_kib(agent.child.id(), "VmHWM:") as f64 / 1024.0,
        bench::rss_kib(agent.child.id(), "VmRSS:") as f64 / 1024.0
    );
    drop(agent);
    Ok(())
}

/// Namespaces `shop` (enforced) and `svc-0..19`, a REGISTRY_ONLY mesh, and `services`
/// Services with controller-managed EndpointSlices, spread over the svc namespaces.
fn cluster(services: usize, export_to: Option<&str>) -> anyhow::Result<FakeApiServer> {
    let server = FakeApiServer::start(&["v1"])?;
    let export = export_to
        .map(|e| format!("    defaultServiceExportTo: [{e}]\n"))
        .unwrap_or_default();
    server.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{egress-enforcer: enabled}}}}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: enforcer-mesh, namespace: enforcer-system}}\n\
         data:\n  mesh: |\n    outboundTrafficPolicy:\n      mode: REGISTRY_ONLY\n{export}"
    ))?;
    for ns in 0..20 {
        server.apply_value(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("svc-{ns}")}}))?;
    }
    for i in 0..services {
        server.apply_value(service(i))?;
        server.apply_value(slice(i, 0))?;
    }
    Ok(server)
}

fn service(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("s{i}"), "namespace": format!("svc-{}", i % 20)},
        "spec": {"clusterIP": format!("10.96.{}.{}", i / 250, i % 250 + 1), "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    })
}

/// Service `i`'s slice in its `version`th state: each version moves one endpoint.
fn slice(i: usize, version: u64) -> Value {
    let endpoints: Vec<Value> = (0..ENDPOINTS)
        .map(|e| {
            let host = (version as usize + e) % 250 + 1;
            json!({"addresses": [format!("10.{}.{}.{host}", 128 + i / 250, i % 250)]})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("s{i}-abc"), "namespace": format!("svc-{}", i % 20), "labels": {
            "kubernetes.io/service-name": format!("s{i}"),
            "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

/// Updates slices at `CHURN_PER_SECOND` until `stop`.
fn slice_churn(server: &FakeApiServer, services: usize, stop: &AtomicBool, updates: &AtomicU64) {
    let every = Duration::from_secs(1) / CHURN_PER_SECOND;
    let start = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let i = (n as usize * 7919) % services;
        if server.apply_value(slice(i, n)).is_ok() {
            updates.fetch_add(1, Ordering::Relaxed);
        }
        let due = start + every * u32::try_from(n).unwrap_or(u32::MAX);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
}

/// Adds a ServiceEntry and waits for its key, then deletes it and waits for the key to go:
/// two change-to-kernel times, in ms.
fn entry_round(
    server: &FakeApiServer,
    exact: &HashMap<MapData, PolicyKey, u32>,
    scope: u32,
    n: u32,
) -> anyhow::Result<Vec<f64>> {
    let addr = [203, 0, 113, u8::try_from(n % 200 + 1).unwrap_or(1)];
    let key = PolicyKey {
        scope,
        port: 443,
        proto: proto::TCP,
        pad: 0,
        addr: ipv4_mapped(addr),
    };
    let ip = format!("{}.{}.{}.{}", addr[0], addr[1], addr[2], addr[3]);
    let started = Instant::now();
    server.apply(&format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: bench-{n}, namespace: shop}}\n\
         spec: {{hosts: [bench-{n}.example.com], addresses: [{ip}], ports: [{{number: 443, name: tls, protocol: TLS}}], resolution: STATIC}}"
    ))?;
    poll(|| exact.get(&key, 0).is_ok(), "the entry to arrive")?;
    let added = started.elapsed();
    let started = Instant::now();
    server.delete("ServiceEntry", "shop", &format!("bench-{n}"))?;
    poll(|| exact.get(&key, 0).is_err(), "the entry to go")?;
    Ok(vec![ms(added), ms(started.elapsed())])
}

/// A pod the API server knows, whose cgroup the kubelet then makes: ms until it is mapped.
fn pod_round(
    server: &FakeApiServer,
    kubelet: &Path,
    trees: &HashMap<MapData, u64, CgroupScope>,
    n: u32,
) -> anyhow::Result<f64> {
    let uid = format!("{n:08x}-1111-4222-8333-444455556666");
    server.apply(&pod_yaml(&format!("p{n}"), &uid))?;
    std::thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    let dir = kubelet.join(format!("kubepods/besteffort/pod{uid}"));
    fs::create_dir_all(&dir)?;
    let id = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&dir)?);
    poll(
        || trees.get(&id, 0).is_ok(),
        "the pod's cgroup to be mapped",
    )?;
    Ok(ms(started.elapsed()))
}

fn pod_yaml(name: &str, uid: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, uid: {uid}}}\n\
         spec: {{nodeName: node-a, containers: [{{name: app, image: app:1}}]}}\nstatus: {{phase: Running}}\n"
    )
}

/// A running pod: its object, and a container cgroup under the fake kubelet's tree.
fn pod(server: &FakeApiServer, kubelet: &Path, name: &str, n: u32) -> anyhow::Result<PathBuf> {
    let uid = format!("{:08x}-2222-4222-8333-444455556666", n);
    server.apply(&pod_yaml(name, &uid))?;
    let dir = kubelet.join(format!(
        "kubepods/besteffort/pod{uid}/cri-containerd-{}.scope",
        "1".repeat(64)
    ));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// connect4's cost per run for a process in a pod's container cgroup: the ancestor walk.
fn walk_cost(container: &Path) -> anyhow::Result<()> {
    let target = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let xtask = std::env::current_exe()?;
    bench::set_bpf_stats(true)?;
    let pin = format!("{PIN_ROOT}/programs/enforcer_connect4");
    let before = bench::prog_stats(&pin)?;
    let out = sh::output(in_cgroup(container, &xtask).args([
        "bench-client",
        "connect",
        &target.to_string(),
        "20000",
    ]))?;
    let after = bench::prog_stats(&pin)?;
    bench::set_bpf_stats(false)?;
    if !out.status.success() {
        bail!(
            "the client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let runs = after.1.saturating_sub(before.1).max(1);
    println!(
        "    connect4 from a pod's container cgroup (5 levels under the kubelet's root): {:.0} ns/run over {runs} runs",
        after.0.saturating_sub(before.0) as f64 / runs as f64
    );
    Ok(())
}

fn start_agent(
    bin: &Path,
    work: &Path,
    server: &FakeApiServer,
    kubelet: &Path,
    extra: &[&str],
) -> anyhow::Result<Agent> {
    let kubeconfig = work.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig)?;
    let status = work.join("status.json");
    let _ = fs::remove_file(&status);
    fs::create_dir_all(kubelet.join("kubepods/besteffort"))?;
    let log = fs::File::create(work.join("agent.log"))?;
    let child = Command::new(bin)
        .args(["run", "--kubernetes", "--node-name", "node-a"])
        .args(["--kubelet-cgroups", KUBELET])
        .args(["--bpffs-root", PIN_ROOT, "--cgroup-parent", CGROUP_PARENT])
        .arg("--status-file")
        .arg(&status)
        .args(extra)
        .env("KUBECONFIG", &kubeconfig)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let agent = Agent {
        child,
        work: work.to_path_buf(),
    };
    let started = Instant::now();
    while !status.exists() {
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "the agent did not start; see {}",
                agent.work.join("agent.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(agent)
}

fn scope_id(name: &str, limit: Duration) -> anyhow::Result<u32> {
    let names: HashMap<MapData, ScopeName, u32> = pinned_hash(map_names::SCOPE_NAMES)?;
    let mut key = ScopeName { name: [0; 64] };
    key.name[..name.len()].copy_from_slice(name.as_bytes());
    let started = Instant::now();
    loop {
        if let Ok(id) = names.get(&key, 0) {
            return Ok(id);
        }
        if started.elapsed() > limit {
            bail!("scope {name} never got an id");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pinned_hash<K: aya::Pod, V: aya::Pod>(name: &str) -> anyhow::Result<HashMap<MapData, K, V>> {
    let path = Path::new(PIN_ROOT).join("maps").join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(HashMap::try_from(Map::HashMap(data))?)
}

/// Polls `cond` every 100 µs, for 10 s at most.
fn poll(mut cond: impl FnMut() -> bool, what: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    while !cond() {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn print_percentiles(what: &str, samples: &[f64]) {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
    };
    match (at(0.5), at(0.99)) {
        (Some(p50), Some(p99)) => println!(
            "    {what}: p50 {p50:.1} ms, p99 {p99:.1} ms ({} samples)",
            v.len()
        ),
        _ => println!("    {what}: no samples"),
    }
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

/// Detaches the agent's pins and removes the fake kubelet tree (its cgroups are empty).
fn cleanup(bin: &Path, kubelet: &Path) {
    let _ = sh::output(Command::new(bin).args([
        "teardown",
        "--bpffs-root",
        PIN_ROOT,
        "--cgroup-parent",
        CGROUP_PARENT,
    ]));
    remove_tree(kubelet);
}
