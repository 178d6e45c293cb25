//! The agent's status file: what it enforces and the inputs it compiled from, so that
//! `enforcer explain` can replay the same compilation without resolving names again.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Where the agent writes its status unless told otherwise.
pub const DEFAULT_PATH: &str = "/run/enforcer/status.json";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub generation: u64,
    pub service_entries: usize,
    /// Scope name to mode.
    pub scopes: BTreeMap<String, String>,
    pub problems: Vec<String>,
    pub notes: Vec<String>,
    /// Each name's addresses, their expiry and those in grace, for people.
    pub dns: Vec<String>,
    /// The last apply's datapath errors (entries left out, fail closed), and since when
    /// (seconds since the epoch) applies have kept failing: `enforcer health` fails then.
    #[serde(default)]
    pub apply_errors: Vec<String>,
    #[serde(default)]
    pub failing_since: Option<u64>,
    /// Refusal records lost since the maps were made (the kernel's counters) and since the
    /// agent started (its output).
    #[serde(default)]
    pub records_lost: RecordsLost,
    /// Established sockets destroyed since the agent started because an apply refused what
    /// they connected to (revocation without TC), and what the last sweep could not do.
    #[serde(default)]
    pub revoked: u64,
    #[serde(default)]
    pub revocation_errors: Vec<String>,
    /// The DNS proxy: its slots, counters and the addresses learned from workloads' answers.
    /// `None` when learning is off or the proxy could not start (see `dns_learning_error`).
    #[serde(default)]
    pub dns_learning: Option<crate::dns::proxy::ProxyReport>,
    #[serde(default)]
    pub dns_learning_error: Option<String>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    #[serde(default)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The control socket, if the agent serves one.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    pub inputs: Inputs,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordsLost {
    /// The ring buffer was full: the agent was slow or down.
    pub ring_full: u64,
    /// Over a scope's budget of records per second (counted, not recorded).
    pub rate_limited: u64,
    /// stdout did not take them.
    pub output_full: u64,
}

/// Everything besides the policy files that the agent's last compilation used.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Inputs {
    pub policies: PathBuf,
    pub mesh_config: Option<PathBuf>,
    pub root_namespace: String,
    pub istio_compat: bool,
    pub allow_cidrs: Vec<IpNet>,
    pub dns_servers: Vec<SocketAddr>,
    pub namespaces: BTreeSet<String>,
    /// The addresses allowed per name (current and in grace).
    pub answers: BTreeMap<String, Vec<IpAddr>>,
    /// Kubernetes mode: the namespaces with workloads on this node, the only ones compiled.
    #[serde(default)]
    pub only_namespaces: Option<BTreeSet<String>>,
    /// `--egress-gateway-only`.
    #[serde(default)]
    pub egress_gateway_only: bool,
    /// `--gateway-any-namespace`.
    #[serde(default)]
    pub gateway_any_namespace: bool,
    /// Namespaces in AUDIT by label (Kubernetes) or `--audit-namespace`.
    #[serde(default)]
    pub audit_namespaces: BTreeSet<String>,
    /// Running pods that ServiceEntries select (by `workloadSelector`): their endpoints.
    #[serde(default)]
    pub endpoint_pods: Vec<crate::datapath::plan::PodAssignment>,
}

impl Status {
    /// Written beside and renamed, so that readers never see half a file.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read(path)
            .with_context(|| format!("reading the agent status {}", path.display()))?;
        serde_json::from_slice(&text)
            .with_context(|| format!("parsing the agent status {}", path.display()))
    }
}
