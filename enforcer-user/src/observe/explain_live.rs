//! What the running agent answers from its live policy, which in Kubernetes mode no file holds:
//! `enforcer explain` (what a pod, or a namespace and labels, gets) and the scopes `enforcer
//! status` lists.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use super::records::Explainer;
use crate::{
    istio::OutboundMode,
    policy::{
        decide::{decide, describe_scope},
        Desired, L4,
    },
};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ExplainQuery {
    pub namespace: String,
    /// A pod of this node, whose labels are used.
    #[serde(default)]
    pub pod: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// A host name or an address.
    pub host: String,
    pub port: u16,
    #[serde(default)]
    pub udp: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExplainAnswer {
    pub scope: String,
    /// The workload's labels (the pod's, when a pod was named).
    pub labels: BTreeMap<String, String>,
    /// The scope in a line: mode and Sidecar.
    pub header: String,
    pub rows: Vec<ExplainRow>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExplainRow {
    pub ip: IpAddr,
    pub allowed: bool,
    pub mode: Option<OutboundMode>,
    /// The decision in a sentence: the rule that allows it, or why nothing does.
    pub why: String,
}

impl ExplainRow {
    /// The compiled policy's decision for one address of the asked host.
    pub fn decide(desired: &Desired, scope: &str, ip: IpAddr, port: u16, l4: L4) -> Self {
        let decision = decide(desired, scope, ip, port, l4);
        ExplainRow {
            ip,
            allowed: decision.allowed,
            mode: decision.mode,
            why: decision.describe(),
        }
    }
}

impl ExplainQuery {
    pub fn answer(&self, ex: &Explainer) -> Result<ExplainAnswer, String> {
        let labels = match &self.pod {
            Some(pod) => ex
                .workloads
                .labels_of(&self.namespace, pod)
                .ok_or_else(|| format!("no pod {}/{pod} runs on this node", self.namespace))?,
            None => self.labels.clone(),
        };
        let desired = &ex.desired;
        if desired.scopes.is_empty() {
            return Err("the agent has not compiled a policy yet".into());
        }
        let ips = match self.host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => ex
                .answers
                .get(&crate::dns::host::normalize(&self.host))
                .filter(|ips| !ips.is_empty())
                .cloned()
                .ok_or_else(|| {
                    format!(
                        "the agent has no addresses for {}: it resolves the hosts of ServiceEntries only; name an address instead",
                        self.host
                    )
                })?,
        };
        let scope = desired
            .scope_for(&self.namespace, &labels)
            .unwrap_or(&self.namespace)
            .to_string();
        let l4 = if self.udp { L4::Udp } else { L4::Tcp };
        let rows = ips
            .into_iter()
            .map(|ip| ExplainRow::decide(desired, &scope, ip, self.port, l4))
            .collect();
        Ok(ExplainAnswer {
            header: describe_scope(desired, &self.namespace, &labels, &scope),
            scope,
            labels,
            rows,
        })
    }
}

/// One scope as `enforcer status` lists it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScopeRow {
    pub scope: String,
    pub namespace: String,
    pub sidecar: Option<String>,
    pub mode: String,
    /// Allow rules compiled for it (a rule: addresses, port and protocol).
    pub rules: usize,
    /// Workloads of this node in it: pods (Kubernetes), namespace and workload cgroups.
    pub workloads: usize,
}

/// The compiled scopes, with this node's workloads counted in each.
pub fn scope_rows(ex: &Explainer) -> Vec<ScopeRow> {
    let desired = &ex.desired;
    let mut workloads: BTreeMap<&str, usize> = BTreeMap::new();
    for (namespace, labels) in ex.workloads.roots() {
        if let Some(scope) = desired.scope_for(namespace, labels) {
            *workloads.entry(scope).or_default() += 1;
        }
    }
    desired
        .scopes
        .iter()
        .map(|(name, p)| ScopeRow {
            scope: name.clone(),
            namespace: p.namespace.clone(),
            sidecar: p.sidecar.clone().or_else(|| p.gateway.clone()),
            mode: p.mode.to_string(),
            rules: p.rules.len(),
            workloads: workloads.get(name.as_str()).copied().unwrap_or(0),
        })
        .collect()
}
