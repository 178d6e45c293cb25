use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Args;
use ipnet::IpNet;

use super::Placement;
use crate::{
    agent::AgentConfig,
    datapath,
    k8s::{
        self,
        node::{NodeOptions, Unmapped},
    },
    resolver::{DnsSettings, Lifetimes},
};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Directory of Istio YAML (`*.yaml`, `*.yml`), watched for changes.
    #[arg(long, value_name = "DIR", required_unless_present = "kubernetes")]
    policies: Option<PathBuf>,
    /// Mesh config: an IstioOperator, Istio's `istio` ConfigMap, or a bare MeshConfig.
    #[arg(long, value_name = "FILE")]
    mesh_config: Option<PathBuf>,
    /// DNS server for resolving ServiceEntry hosts [default: the system's].
    #[arg(long, value_name = "IP:PORT")]
    dns_server: Option<SocketAddr>,
    /// Shortest TTL honoured, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    dns_min_ttl: u64,
    /// Longest TTL honoured, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    dns_max_ttl: u64,
    /// How long an address a name no longer resolves to stays allowed, in seconds
    /// [default: the larger of its TTL and 120].
    #[arg(long, value_name = "SECS")]
    dns_grace: Option<u64>,
    /// Most addresses kept per name, current ones first.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    dns_max_ips: usize,
    /// Always allowed for every namespace (loopback always is). Repeatable.
    #[arg(long, value_name = "CIDR")]
    allow_cidr: Vec<IpNet>,
    /// Namespace whose Sidecar without a workloadSelector is the default for all namespaces.
    #[arg(long, value_name = "NS", default_value = "istio-system")]
    root_namespace: String,
    /// Follow Istio where `resolution: NONE` has no addresses: any IP on an opaque TCP port.
    #[arg(long)]
    istio_compat: bool,
    /// Refuse every port and protocol of a gateway-routed host to all but its egress
    /// gateway's workloads (an egress gateway plus a NetworkPolicy, in one).
    #[arg(long)]
    egress_gateway_only: bool,
    /// Put a namespace in AUDIT, whatever the mesh and its Sidecars say: everything is allowed
    /// and what REGISTRY_ONLY would refuse is recorded (a dry run). Repeatable. In Kubernetes
    /// mode the namespace label egress-enforcer=audit does the same.
    #[arg(long = "audit-namespace", value_name = "NS")]
    audit_namespaces: Vec<String>,
    /// Where to serve /metrics (Prometheus), /healthz and /readyz; `off` for nowhere. Port 0
    /// picks one (the status file's `metrics_addr` says which).
    #[arg(long, value_name = "ADDR|off", env = "ENFORCER_METRICS_ADDR", default_value = "127.0.0.1:9978", value_parser = parse_metrics_addr)]
    metrics_addr: MetricsAddr,
    /// The control socket that `enforcer events`, `explain` and `audit-report` ask (root
    /// only); `off` for none [default: agent.sock beside the status file].
    #[arg(long, value_name = "PATH|off")]
    control_socket: Option<PathBuf>,
    /// Istio's reach across namespaces: a Gateway's selector chooses workloads in every
    /// namespace, and a VirtualService redirects every namespace it is exported to. Without
    /// it, a Gateway chooses in its own namespace and a VirtualService redirects its own (from
    /// the root namespace, all), so that no tenant turns its pods into gateway workloads by
    /// labelling them, or sends other namespaces' connections to its pods.
    #[arg(long)]
    gateway_any_namespace: bool,
    /// Map an existing cgroup (path relative to the cgroup2 mount) to a namespace. Repeatable.
    #[arg(long = "cgroup", value_name = "NS=PATH", value_parser = parse_mapping)]
    cgroups: Vec<(String, PathBuf)>,
    /// Create the cgroup of this namespace at start. Repeatable.
    #[arg(long = "namespace", value_name = "NS")]
    namespaces: Vec<String>,
    /// Capacity of the exact allow map (used when the maps are first created).
    #[arg(long, value_name = "N", default_value_t = 131_072)]
    max_entries: u32,
    /// Capacity of the CIDR allow trie (used when the maps are first created).
    #[arg(long, value_name = "N", default_value_t = 65_536)]
    max_cidr_entries: u32,
    /// Capacity of the scope-name map: namespaces and selecting Sidecars in use at once
    /// (used when the maps are first created). Ids of scopes gone are reused.
    #[arg(long, value_name = "N", default_value_t = 65_536)]
    max_scopes: u32,
    /// Write a JSON status (generation, problems, DNS answers, inputs) here after every change;
    /// `enforcer explain` reads it.
    #[arg(long, value_name = "FILE", default_value = crate::observe::status::DEFAULT_PATH)]
    status_file: PathBuf,
    /// Addresses for local pods (`enforcer exec --netns`), a /30 each. Without it, no pods.
    #[arg(long, value_name = "CIDR")]
    pod_cidr: Option<ipnet::Ipv4Net>,
    /// IPv6 addresses for local pods as well, a /126 each (needs --pod-cidr). Turns on IPv6
    /// forwarding, which makes the host ignore router advertisements, as on any router.
    #[arg(long, value_name = "CIDR", requires = "pod_cidr")]
    pod_cidr6: Option<ipnet::Ipv6Net>,
    /// Let ICMP from pods pass the TC program unjudged (by default no ServiceEntry allows it).
    #[arg(long)]
    tc_pass_icmp: bool,
    /// Socket kinds that enforced namespaces may create although no ServiceEntry can judge
    /// them at connect time (comma-separated). Each is refused by default.
    #[arg(long, value_delimiter = ',', value_enum, value_name = "KIND")]
    allow_sockets: Vec<SocketKind>,
    #[command(flatten)]
    learning: LearningArgs,
    #[command(flatten)]
    placement: Placement,
    #[command(flatten)]
    kube: KubeArgs,
}

/// Learning from workloads' own DNS answers (a ServiceEntry host, wildcards included, allows
/// the addresses the workload's lookups return).
#[derive(Args, Debug)]
struct LearningArgs {
    /// Which addresses a ServiceEntry host allows: those the agent's own lookups give and
    /// those workloads' own DNS answers give (both), only the agent's (resolved: no DNS proxy,
    /// and wildcard hosts allow nothing), or only the workloads' (learned).
    #[arg(long, value_enum, value_name = "WHICH", default_value = "both")]
    dns_allow: DnsAllow,
    /// DNS servers whose port-53 traffic from workloads goes through the proxy (IPv4).
    /// Repeatable [default: the nameservers of /etc/resolv.conf and --dns-server on port 53].
    #[arg(long = "dns-upstream", value_name = "IP")]
    upstreams: Vec<std::net::Ipv4Addr>,
    /// A /24 the node routes to itself for the proxy; the last byte says which scope asked.
    #[arg(long, value_name = "CIDR", default_value = "169.254.53.0/24")]
    dns_proxy_prefix: ipnet::Ipv4Net,
    /// The proxy's port for the first upstream; the next ones follow.
    #[arg(long, value_name = "PORT", default_value_t = 10053)]
    dns_proxy_port_base: u16,
    /// Addresses no answer may teach, besides loopback, link-local, multicast and the pod
    /// range. Repeatable.
    #[arg(long = "dns-learn-deny", value_name = "CIDR")]
    learn_deny: Vec<IpNet>,
    /// Capacity of the learned-address map (used when the maps are first created).
    #[arg(long, value_name = "N", default_value_t = 65_536)]
    dns_max_learned: u32,
    /// Learned addresses per scope (address and port pairs): a flood of names under a
    /// wildcard fills only its scope's share, then gets SERVFAIL.
    #[arg(long, value_name = "N", default_value_t = 16_384)]
    dns_max_learned_per_scope: usize,
    /// How long an expired learned address stays for flows that were allowed while it was
    /// valid (they keep flowing in pods), in seconds. New connections are refused at expiry.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    dns_idle_grace: u64,
    /// Tests only: release answers at once and learn this many milliseconds later, so that
    /// the race test can show it catches a proxy that does not hold answers.
    #[arg(long, hide = true, value_name = "MS", default_value_t = 0)]
    dns_debug_learn_delay_ms: u64,
}

impl LearningArgs {
    fn options(
        &self,
        dns_server: Option<SocketAddr>,
        limits: crate::dns::learner::Limits,
    ) -> anyhow::Result<Option<crate::dns::proxy::ProxyOptions>> {
        if self.dns_allow == DnsAllow::Resolved {
            return Ok(None);
        }
        let mut upstreams = self.upstreams.clone();
        if upstreams.is_empty() {
            upstreams = system_nameservers();
            if let Some(SocketAddr::V4(s)) = dns_server.filter(|s| s.port() == 53) {
                upstreams.push(*s.ip());
            }
            upstreams.dedup();
        }
        anyhow::ensure!(
            self.dns_proxy_prefix.prefix_len() == 24,
            "--dns-proxy-prefix {} must be a /24",
            self.dns_proxy_prefix
        );
        Ok(Some(crate::dns::proxy::ProxyOptions {
            prefix: self.dns_proxy_prefix.trunc(),
            port_base: self.dns_proxy_port_base,
            upstreams,
            limits,
            timeout: Duration::from_secs(5),
            debug_learn_delay: Duration::from_millis(self.dns_debug_learn_delay_ms),
        }))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DnsAllow {
    Both,
    Resolved,
    Learned,
}

/// The IPv4 nameservers of /etc/resolv.conf, on port 53.
fn system_nameservers() -> Vec<std::net::Ipv4Addr> {
    let Ok(text) = std::fs::read_to_string("/etc/resolv.conf") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse().ok())
        .collect()
}

/// Kubernetes mode: one agent per node, policy from the API server.
#[derive(Args, Debug)]
struct KubeArgs {
    /// Read Istio objects, Services, Namespaces and this node's Pods from the API server
    /// (in-cluster config, or KUBECONFIG) and enforce on the pods' cgroups.
    #[arg(long, conflicts_with_all = ["policies", "mesh_config"])]
    kubernetes: bool,
    /// This node's name (the DaemonSet passes spec.nodeName).
    #[arg(
        long,
        env = "NODE_NAME",
        value_name = "NAME",
        required_if_eq("kubernetes", "true")
    )]
    node_name: Option<String>,
    /// Namespaces whose pods are enforced, as a label selector (`istio-injection=enabled` gives
    /// Istio's injection scope).
    #[arg(
        long,
        value_name = "SELECTOR",
        default_value = "egress-enforcer=enabled"
    )]
    namespace_selector: k8s::LabelSelector,
    /// ConfigMaps holding the mesh config (key `mesh`); the first that exists is used.
    #[arg(long = "mesh-config-map", value_name = "NS/NAME", value_parser = parse_ns_name,
          default_values = ["istio-system/istio", "enforcer-system/enforcer-mesh"])]
    mesh_config_maps: Vec<(String, String)>,
    /// Cluster DNS domain of Services.
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// The CNI translates Services at connect time (Cilium with kube-proxy replacement, its
    /// socket LB): connect() then names a Service's endpoint, not its cluster IP, so the
    /// controller-managed endpoints of ClusterIP Services are allowed too. Without it only
    /// cluster IPs are, as in Istio; headless Services always give their endpoints.
    #[arg(long)]
    socket_lb: bool,
    /// Where the kubelet's cgroups are, relative to the cgroup2 mount [default: the mount].
    #[arg(long, value_name = "PATH")]
    kubelet_cgroups: Option<PathBuf>,
    /// What a pod cgroup not mapped yet gets (it exists before the agent saw it).
    #[arg(long, value_enum, value_name = "POLICY", default_value = "mesh")]
    unmapped_pods: Unmapped,
    /// Enforce hostNetwork pods too (by their namespace, at connect only).
    #[arg(long)]
    enforce_host_network: bool,
    /// The host's /proc (with hostPID): finds veths of pods behind a bridge through their
    /// network namespace. Without it, packet-level enforcement covers routed CNIs only.
    #[arg(long, value_name = "DIR")]
    host_proc: Option<PathBuf>,
}

fn parse_ns_name(s: &str) -> Result<(String, String), String> {
    let (ns, name) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not NAMESPACE/NAME"))?;
    Ok((ns.to_string(), name.to_string()))
}

impl KubeArgs {
    fn options(self, cgroup_root: &std::path::Path) -> Option<NodeOptions> {
        if !self.kubernetes {
            return None;
        }
        Some(NodeOptions {
            cluster: k8s::Options {
                node_name: self.node_name.unwrap_or_default(),
                namespace_selector: self.namespace_selector,
                mesh_config_maps: self.mesh_config_maps,
                cluster_domain: self.cluster_domain,
                socket_lb: self.socket_lb,
            },
            kubelet_cgroups: match self.kubelet_cgroups {
                Some(path) => cgroup_root.join(path),
                None => cgroup_root.to_path_buf(),
            },
            unmapped: self.unmapped_pods,
            enforce_host_network: self.enforce_host_network,
            host_proc: self.host_proc,
        })
    }
}

/// The file need not exist yet (it may be created later), but its directory must.
fn absolute(path: &std::path::Path) -> anyhow::Result<PathBuf> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let name = path.file_name().context("not a file path")?;
    Ok(std::fs::canonicalize(dir)?.join(name))
}

fn parse_mapping(s: &str) -> Result<(String, PathBuf), String> {
    let (ns, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NS=PATH"))?;
    if !crate::policy::is_dns1123_label(ns) {
        return Err(format!("{ns:?} is not a valid namespace name"));
    }
    Ok((ns.to_string(), PathBuf::from(path)))
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.dns_min_ttl <= args.dns_max_ttl,
        "--dns-min-ttl must not exceed --dns-max-ttl"
    );
    let cgroups = args.placement.layout(&args.cgroups)?;
    // Absolute paths: file events name absolute paths, and the watch filters compare with them.
    let policies = match &args.policies {
        Some(dir) => {
            let abs = std::fs::canonicalize(dir)
                .with_context(|| format!("--policies {}", dir.display()))?;
            anyhow::ensure!(
                abs.is_dir(),
                "--policies {} is not a directory",
                abs.display()
            );
            abs
        }
        None => PathBuf::new(),
    };
    let kubernetes = args.kube.options(&cgroups.root);
    let mesh_config = match &args.mesh_config {
        Some(path) => {
            Some(absolute(path).with_context(|| format!("--mesh-config {}", path.display()))?)
        }
        None => None,
    };
    let mut deny = crate::dns::learner::default_deny();
    deny.extend(args.learning.learn_deny.iter().copied());
    deny.extend(args.pod_cidr.map(IpNet::V4));
    deny.extend(args.pod_cidr6.map(IpNet::V6));
    deny.push(IpNet::V4(args.learning.dns_proxy_prefix));
    let limits = crate::dns::learner::Limits {
        life: crate::dns::learn::Lifetime {
            min_ttl: Duration::from_secs(args.dns_min_ttl),
            max_ttl: Duration::from_secs(args.dns_max_ttl),
            grace: Duration::from_secs(args.dns_grace.unwrap_or(120)),
        },
        max_ips: args.dns_max_ips.max(1),
        max_per_scope: args.learning.dns_max_learned_per_scope,
        deny,
        idle_grace_ns: args.learning.dns_idle_grace.saturating_mul(1_000_000_000),
    };
    let dns_proxy = args.learning.options(args.dns_server, limits)?;
    let cfg = AgentConfig {
        policies,
        kubernetes,
        mesh_config,
        dns: DnsSettings {
            server: args.dns_server,
            lifetimes: Lifetimes {
                min_ttl: Duration::from_secs(args.dns_min_ttl),
                max_ttl: Duration::from_secs(args.dns_max_ttl),
                grace: args.dns_grace.map(Duration::from_secs),
                max_ips: args.dns_max_ips.max(1),
            },
        },
        allow_cidrs: args.allow_cidr,
        istio_compat: args.istio_compat,
        egress_gateway_only: args.egress_gateway_only,
        metrics_addr: args.metrics_addr.0,
        control_socket: match args.control_socket {
            Some(path) if path.as_os_str() == "off" => None,
            Some(path) => Some(path),
            None => Some(crate::observe::control::default_path(&args.status_file)),
        },
        audit_namespaces: args.audit_namespaces,
        gateway_any_namespace: args.gateway_any_namespace,
        datapath: datapath::Options {
            pin_root: args.placement.pin_root(),
            cgroup_root: cgroups.root.clone(),
            max_exact: args.max_entries,
            max_cidr: args.max_cidr_entries,
            max_scopes: args.max_scopes,
            max_learned: args.learning.dns_max_learned,
        },
        cgroups,
        root_namespace: args.root_namespace,
        namespaces: args.namespaces,
        status_file: args.status_file,
        pods: args.pod_cidr.map(|v4| crate::pods::PodNetwork {
            dir: args.placement.pods_dir(),
            v4,
            v6: args.pod_cidr6,
        }),
        judge_icmp: !args.tc_pass_icmp,
        allow_sockets: args.allow_sockets.iter().fold(0, |f, k| f | k.flag()),
        dns_proxy,
        pre_resolve: args.learning.dns_allow != DnsAllow::Learned,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(crate::agent::run(cfg))
}

/// Sockets the address hooks cannot judge (`--allow-sockets`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SocketKind {
    /// `SOCK_RAW`: any packet, any destination.
    Raw,
    /// ICMP datagram sockets (unprivileged ping).
    Ping,
    Sctp,
    Udplite,
    /// MPTCP: the kernel opens subflows to addresses the peer advertises.
    Mptcp,
    /// Every other protocol of an IPv4 or IPv6 socket.
    Other,
}

impl SocketKind {
    fn flag(self) -> u32 {
        use enforcer_common::tc_flags;
        match self {
            Self::Raw => tc_flags::ALLOW_RAW,
            Self::Ping => tc_flags::ALLOW_PING,
            Self::Sctp => tc_flags::ALLOW_SCTP,
            Self::Udplite => tc_flags::ALLOW_UDPLITE,
            Self::Mptcp => tc_flags::ALLOW_MPTCP,
            Self::Other => tc_flags::ALLOW_OTHER,
        }
    }
}

/// `--metrics-addr`: an address, or `None` for `off`.
#[derive(Clone, Copy, Debug)]
struct MetricsAddr(Option<std::net::SocketAddr>);

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s == "off" {
        return Ok(MetricsAddr(None));
    }
    // `$(HOST):9978` in a manifest makes an IPv6 node's address unbracketed: the port is
    // after the last colon.
    let unbracketed = || {
        let (ip, port) = s.rsplit_once(':')?;
        Some(std::net::SocketAddr::new(
            ip.parse().ok()?,
            port.parse().ok()?,
        ))
    };
    s.parse()
        .ok()
        .or_else(unbracketed)
        .map(|a| MetricsAddr(Some(a)))
        .ok_or_else(|| {
            format!("{s:?}: not an address with a port (127.0.0.1:9978, [::1]:9978), or off")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addresses() {
        let addr = |s: &str| parse_metrics_addr(s).map(|a| a.0);
        assert_eq!(
            addr("127.0.0.1:9978"),
            Ok(Some("127.0.0.1:9978".parse().unwrap()))
        );
        assert_eq!(
            addr("[2001:db8::1]:9978"),
            Ok(Some("[2001:db8::1]:9978".parse().unwrap()))
        );
        // As the DaemonSet's $(ENFORCER_METRICS_HOST):9978 makes it on an IPv6 node.
        assert_eq!(
            addr("2001:db8::1:9978"),
            Ok(Some("[2001:db8::1]:9978".parse().unwrap()))
        );
        assert_eq!(addr("off"), Ok(None));
        assert!(addr("localhost:9978").is_err());
        assert!(addr("127.0.0.1").is_err());
    }
}
