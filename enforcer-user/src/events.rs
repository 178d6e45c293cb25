//! Refusal records from the kernel's ring buffer, explained and printed as JSON lines.

use std::{
    collections::BTreeMap,
    io::Write,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use aya::maps::{MapData, RingBuf};
use enforcer_common::{hook, verdict, DenyEvent};
use serde::Serialize;
use tokio::io::unix::AsyncFd;

use crate::{
    net::from_key_bytes,
    policy::{decide, Desired, L4},
};

/// What the agent knows that turns an id-only kernel record into a readable one.
#[derive(Debug, Default)]
pub struct Explainer {
    /// Scope id to scope name.
    pub scopes: BTreeMap<u32, String>,
    pub cgroups: BTreeMap<u64, PathBuf>,
    /// The state the kernel maps were last brought to.
    pub desired: Arc<Desired>,
}

#[derive(Debug, Serialize)]
pub struct DenyRecord {
    pub time_unix_ms: u128,
    /// `denied`; `audit` for what REGISTRY_ONLY would have refused; `revoked` for a flow the
    /// TC program cut after the policy changed.
    pub verdict: &'static str,
    pub namespace: String,
    /// The Sidecar in force for the workload, if any.
    pub sidecar: Option<String>,
    pub pid: u32,
    pub comm: String,
    /// Where it was caught: connect4/6, sendmsg4/6, or tc (a packet on a pod's veth).
    pub hook: &'static str,
    pub cgroup: String,
    pub dst: String,
    pub port: u16,
    pub proto: String,
    pub host: Option<String>,
    pub reason: String,
}

impl Explainer {
    pub fn record(&self, ev: &DenyEvent) -> DenyRecord {
        let ip = from_key_bytes(ev.addr);
        let scope = self
            .scopes
            .get(&ev.scope)
            .cloned()
            .unwrap_or_else(|| format!("scope-{}", ev.scope));
        let policy = self.desired.scopes.get(&scope);
        let namespace = policy.map_or_else(
            || scope.split('/').next().unwrap_or_default().to_string(),
            |p| p.namespace.clone(),
        );
        let l4 = L4::from_ip_proto(ev.proto);
        let proto = match (l4, ev.proto) {
            (Some(l4), _) => l4.to_string(),
            (None, enforcer_common::proto::ICMP) => "icmp".to_string(),
            (None, enforcer_common::proto::ICMPV6) => "icmpv6".to_string(),
            (None, other) => format!("ip-proto-{other}"),
        };
        let host = self
            .desired
            .hosts_by_ip
            .get(&ip)
            .and_then(|r| r.first())
            .map(|r| r.host.clone());
        let mut reason = match l4 {
            Some(l4) => decide::refusal(&self.desired, &scope, ip, ev.port, l4),
            None => format!(
                "{proto} is judged on pod veths and no ServiceEntry allows it (--tc-pass-icmp lets ICMP pass)"
            ),
        };
        let kind = match ev.verdict {
            verdict::AUDIT => {
                reason = format!("AUDIT: REGISTRY_ONLY would refuse this: {reason}");
                "audit"
            }
            verdict::REVOKED => {
                reason = format!(
                    "revoked: this flow was allowed under an earlier policy and its packets are now dropped: {reason}"
                );
                "revoked"
            }
            _ => "denied",
        };
        DenyRecord {
            time_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or_default(),
            verdict: kind,
            namespace,
            sidecar: policy.and_then(|p| p.sidecar.clone()),
            pid: ev.pid,
            comm: String::from_utf8_lossy(ev.comm.split(|&b| b == 0).next().unwrap_or_default())
                .into_owned(),
            hook: match ev.hook {
                hook::CONNECT4 => "connect4",
                hook::CONNECT6 => "connect6",
                hook::SENDMSG4 => "sendmsg4",
                hook::SENDMSG6 => "sendmsg6",
                hook::TC => "tc",
                _ => "unknown",
            },
            // The TC program sees packets, not processes.
            cgroup: if ev.hook == hook::TC {
                "(packet on a pod veth)".to_string()
            } else {
                self.cgroups
                    .get(&ev.cgroup_id)
                    .map_or_else(|| ev.cgroup_id.to_string(), |p| p.display().to_string())
            },
            dst: ip.to_string(),
            port: ev.port,
            proto,
            host,
            reason,
        }
    }
}

/// Reads the ring buffer until the agent stops, printing one JSON line per record on stdout.
pub async fn run(ring: RingBuf<MapData>, explainer: Arc<RwLock<Explainer>>) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its fd, which stays open and unchanged while the AsyncFd
    // owns the ring buffer.
    let mut fd = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("watching the ring buffer: {}", e.into_parts().1))?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        let mut out = std::io::stdout().lock();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<DenyEvent>() {
                continue;
            }
            // SAFETY: the length was checked and DenyEvent is plain old data.
            let ev: DenyEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let record = match explainer.read() {
                Ok(ex) => ex.record(&ev),
                Err(poisoned) => poisoned.into_inner().record(&ev),
            };
            if let Ok(line) = serde_json::to_string(&record) {
                let _ = writeln!(out, "{line}");
            }
        }
        let _ = out.flush();
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explains_a_refusal_with_the_host_and_its_export() {
        use crate::policy::{HostRef, ScopePolicy};
        let ip: std::net::IpAddr = "198.51.100.20".parse().unwrap();
        let mut desired = Desired::default();
        desired.scopes.insert(
            "default".into(),
            ScopePolicy {
                namespace: "default".into(),
                ..ScopePolicy::default()
            },
        );
        desired
            .hosts_by_ip
            .entry(ip)
            .or_default()
            .push(Arc::new(HostRef {
                host: "db.example.com".into(),
                service_entry: "frontend/postgres-db".into(),
                visible_to: Some(["frontend".to_string()].into()),
            }));
        let mut ex = Explainer {
            desired: Arc::new(desired),
            ..Explainer::default()
        };
        ex.scopes.insert(2, "default".into());
        let ev = DenyEvent {
            ts_ns: 0,
            cgroup_id: 42,
            scope: 2,
            pid: 7,
            comm: *b"psql\0\0\0\0\0\0\0\0\0\0\0\0",
            addr: crate::net::key_bytes(ip),
            port: 5432,
            proto: 6,
            verdict: verdict::DENIED,
            hook: 1,
            pad: [0; 3],
        };
        let rec = ex.record(&ev);
        assert_eq!(rec.namespace, "default");
        assert_eq!(rec.comm, "psql");
        assert_eq!(rec.host.as_deref(), Some("db.example.com"));
        assert!(
            rec.reason.starts_with(
                "no ServiceEntry visible to namespace default allows 198.51.100.20:5432/tcp"
            ),
            "{}",
            rec.reason
        );
        assert!(
            rec.reason.contains("exported only to [frontend]"),
            "{}",
            rec.reason
        );
    }
}
