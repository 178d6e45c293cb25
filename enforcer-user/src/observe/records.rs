//! Records: the kernel's id-only refusal events, explained (who, where, which rule) into the
//! JSON records the agent prints (`output.rs`) and `enforcer events` streams.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use enforcer_common::{hook, reason, verdict, DenyEvent};
use serde::Serialize;

use crate::{
    net::from_key_bytes,
    policy::{decide, Desired, L4},
    revoke::{Action, Revocation},
};

/// What the agent knows that turns an id-only kernel record into a readable one.
#[derive(Debug)]
pub struct Explainer {
    /// Scope id to scope name.
    pub scopes: BTreeMap<u32, String>,
    /// Who runs in each cgroup and behind each veth.
    pub workloads: super::workload::Workloads,
    /// The state the kernel maps were last brought to.
    pub desired: Arc<Desired>,
    /// The DNS answers it was compiled with, for `explain` by host name.
    pub answers: Arc<BTreeMap<String, Vec<std::net::IpAddr>>>,
    /// What the DNS proxy learned, or why it is not learning.
    pub learning: Result<crate::dns::proxy::LearningHandle, String>,
}

impl Default for Explainer {
    fn default() -> Self {
        Self {
            scopes: BTreeMap::new(),
            workloads: super::workload::Workloads::default(),
            desired: Arc::default(),
            answers: Arc::default(),
            learning: Err("not started".into()),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DenyRecord {
    pub time_unix_ms: u128,
    /// `denied`; `audit` for what REGISTRY_ONLY would have refused; `revoked` for a flow the
    /// TC program cut, or a socket the agent destroyed, after the policy changed.
    pub verdict: &'static str,
    pub namespace: String,
    /// The pod: a Kubernetes pod's name, a local pod's network namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The workload's labels (which select its Sidecar).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The Sidecar in force for the workload, if any.
    pub sidecar: Option<String>,
    pub pid: u32,
    pub comm: String,
    /// Where it was caught: connect4/6, sendmsg4/6, tc (a packet on a pod's veth), or revoke
    /// (an established socket the agent destroyed after an apply).
    pub hook: &'static str,
    pub cgroup: String,
    pub dst: String,
    pub port: u16,
    pub proto: String,
    pub host: Option<String>,
    /// A stable code for why: `no_rule`, `socket_type`, `source_route`, `spoofed_source`,
    /// `not_ip`, `loopback`, `unjudgeable`, `unknown_veth`, `gateway_bypass`, `gateway_refused`.
    pub reason_code: &'static str,
    pub reason: String,
    /// For a scope that learns from DNS answers: why learning did not allow the address
    /// (`never_answered`, `undeclared_name`, `expired`, `other_port`, `other_scope`,
    /// `learning_off`); the reason says more.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning: Option<&'static str>,
    /// For a destination routed through an egress gateway (`gateway_bypass`,
    /// `gateway_refused`): the VirtualService that routes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virtual_service: Option<String>,
    /// That route's Gateway; or, for a gateway's own workload, the Gateways that chose it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

impl DenyRecord {
    /// A record as the agent printed it (a JSON line), for reports made afterwards; `None`
    /// for a line that is not one (a log line).
    pub fn from_line(line: &str) -> Option<Self> {
        #[derive(serde::Deserialize)]
        struct Line {
            time_unix_ms: u128,
            verdict: String,
            namespace: String,
            #[serde(default)]
            pod: Option<String>,
            #[serde(default)]
            labels: BTreeMap<String, String>,
            #[serde(default)]
            sidecar: Option<String>,
            #[serde(default)]
            pid: u32,
            #[serde(default)]
            comm: String,
            hook: String,
            dst: String,
            port: u16,
            proto: String,
            host: Option<String>,
            reason_code: String,
            reason: String,
        }
        // The codes are the agent's own: a line with another is not its record. So are the
        // shapes of its namespaces and destinations (a saved file may have been edited).
        let l: Line = serde_json::from_str(line.trim()).ok()?;
        let name_like = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        if !name_like(&l.namespace)
            || !(l.dst.is_empty() || l.dst.parse::<std::net::IpAddr>().is_ok())
        {
            return None;
        }
        Some(Self {
            time_unix_ms: l.time_unix_ms,
            verdict: ["denied", "audit", "revoked"]
                .into_iter()
                .find(|v| *v == l.verdict)?,
            namespace: l.namespace,
            pod: l.pod,
            labels: l.labels,
            sidecar: l.sidecar,
            pid: l.pid,
            comm: l.comm,
            hook: (0..=u8::MAX).map(hook_name).find(|h| *h == l.hook)?,
            dst: l.dst,
            port: l.port,
            proto: l.proto,
            host: l.host,
            reason_code: (0..=u8::MAX)
                .map(reason_code)
                .find(|c| *c == l.reason_code)?,
            reason: l.reason,
            ..Self::default()
        })
    }
}

fn reason_code(code: u8) -> &'static str {
    match code {
        reason::NO_RULE => "no_rule",
        reason::SOCKET_TYPE => "socket_type",
        reason::SOURCE_ROUTE => "source_route",
        reason::SPOOFED_SOURCE => "spoofed_source",
        reason::NOT_IP => "not_ip",
        reason::LOOPBACK => "loopback",
        reason::UNJUDGEABLE => "unjudgeable",
        reason::UNKNOWN_VETH => "unknown_veth",
        reason::GATEWAY_BYPASS => "gateway_bypass",
        reason::GATEWAY_REFUSED => "gateway_refused",
        _ => "unknown",
    }
}

fn hook_name(code: u8) -> &'static str {
    match code {
        hook::CONNECT4 => "connect4",
        hook::CONNECT6 => "connect6",
        hook::SENDMSG4 => "sendmsg4",
        hook::SENDMSG6 => "sendmsg6",
        hook::TC => "tc",
        hook::SOCK_CREATE => "sock_create",
        hook::SETSOCKOPT => "setsockopt",
        hook::SKB_EGRESS => "skb_egress",
        _ => "unknown",
    }
}

/// The socket kind a `socket_type` record is about (its protocol is in the port field).
fn socket_kind(kind: u8, protocol: u16) -> String {
    match (kind, protocol) {
        (3, _) => format!("a raw socket (protocol {protocol})"),
        (2, 1 | 58) => "an ICMP datagram (ping) socket".to_string(),
        (_, 132) => "an SCTP socket".to_string(),
        (_, 136) => "a UDP-Lite socket".to_string(),
        (_, 262) => "an MPTCP socket".to_string(),
        _ => format!("a socket of type {kind}, protocol {protocol}"),
    }
}

/// The sentence for a record that policy rules did not decide.
fn special_reason(ev: &DenyEvent, dst: &str) -> Option<String> {
    Some(match ev.reason {
        reason::SOCKET_TYPE => format!(
            "{} cannot be judged by destination: refused in enforced namespaces (--allow-sockets allows it)",
            socket_kind(ev.sock_type, ev.port)
        ),
        reason::SOURCE_ROUTE if ev.hook == hook::SETSOCKOPT => format!(
            "a source route (socket option {} at level {}) would send packets to a first hop that is never judged",
            ev.port, ev.proto
        ),
        reason::SOURCE_ROUTE => format!(
            "a packet with IP options or an IPv6 routing header towards {dst}: its destination is only the first hop"
        ),
        reason::SPOOFED_SOURCE => format!(
            "a packet towards {dst} whose source address is not the pod's own (spoofed)"
        ),
        reason::NOT_IP => "a frame that is neither IPv4, IPv6 nor ARP (a VLAN tag, another ethertype) cannot be judged".to_string(),
        reason::LOOPBACK => format!("a packet to the loopback address {dst} on a pod's wire"),
        reason::UNJUDGEABLE => format!(
            "a packet towards {dst} that cannot be judged: a fragment whose first fragment was not seen, or too many IPv6 extension headers"
        ),
        reason::UNKNOWN_VETH => format!(
            "a packet towards {dst} on a veth the agent registered no pod for"
        ),
        _ => return None,
    })
}

impl Explainer {
    pub fn record(&self, ev: &DenyEvent) -> DenyRecord {
        let mut record = self.explain(ev);
        match ev.verdict {
            verdict::AUDIT => {
                record.reason =
                    format!("AUDIT: REGISTRY_ONLY would refuse this: {}", record.reason);
                record.verdict = "audit";
            }
            verdict::REVOKED => {
                record.reason = format!(
                    "revoked: this flow was allowed under an earlier policy and its packets are now dropped: {}",
                    record.reason
                );
                record.verdict = "revoked";
            }
            _ => {}
        }
        record
    }

    /// A socket the agent destroyed (or, in AUDIT mode, would have) after an apply refused
    /// what it had connected to. Sockets name no process: pid 0, no comm.
    /// Whether a VirtualService routes `ip:port` through a gateway for scope `id`.
    fn routed(&self, id: u32, ip: std::net::IpAddr, port: u16) -> bool {
        self.scopes
            .get(&id)
            .and_then(|name| self.desired.scopes.get(name))
            .and_then(|p| crate::policy::gateway::route_for(&p.redirects, ip, port))
            .is_some()
    }

    pub fn revocation(&self, r: &Revocation) -> DenyRecord {
        let ev = DenyEvent {
            ts_ns: 0,
            cgroup_id: r.cgroup,
            scope: r.scope,
            pid: 0,
            comm: [0; 16],
            addr: crate::net::key_bytes(r.dst.addr),
            port: r.dst.port,
            proto: r.dst.proto,
            verdict: verdict::DENIED,
            hook: 0,
            // A flow to a destination now routed through a gateway went around it.
            reason: if self.routed(r.scope, r.dst.addr, r.dst.port) {
                reason::GATEWAY_BYPASS
            } else {
                reason::NO_RULE
            },
            sock_type: 0,
            pad: 0,
        };
        let mut record = self.explain(&ev);
        record.hook = "revoke";
        match r.action {
            Action::Destroy => {
                record.verdict = "revoked";
                record.reason = format!(
                    "revoked: this established flow was allowed under an earlier policy; its socket was destroyed: {}",
                    record.reason
                );
            }
            Action::Report => {
                record.verdict = "audit";
                record.reason = format!(
                    "AUDIT: REGISTRY_ONLY would revoke this established flow: {}",
                    record.reason
                );
            }
        }
        record
    }

    /// The record with the plain refusal reason and verdict `denied`.
    fn explain(&self, ev: &DenyEvent) -> DenyRecord {
        let ip = from_key_bytes(ev.addr);
        let scope = self
            .scopes
            .get(&ev.scope)
            .cloned()
            .unwrap_or_else(|| match ev.scope {
                enforcer_common::GLOBAL_SCOPE => "(no pod)".to_string(),
                other => format!("scope-{other}"),
            });
        let policy = self.desired.scopes.get(&scope);
        let namespace = policy.map_or_else(
            || scope.split('/').next().unwrap_or_default().to_string(),
            |p| p.namespace.clone(),
        );
        let who = match ev.hook {
            hook::TC => u32::try_from(ev.cgroup_id)
                .ok()
                .and_then(|ifindex| self.workloads.of_veth(ifindex)),
            _ => self.workloads.of_cgroup(ev.cgroup_id),
        };
        let l4 = L4::from_ip_proto(ev.proto);
        let proto = proto_name(ev.proto.into());
        let host = self
            .desired
            .hosts_by_ip
            .get(&ip)
            .and_then(|r| r.first())
            .map(|r| r.host.clone());
        let route = policy
            .filter(|_| matches!(ev.reason, reason::GATEWAY_BYPASS | reason::GATEWAY_REFUSED))
            .and_then(|p| crate::policy::gateway::route_for(&p.redirects, ip, ev.port));
        let reason = match (special_reason(ev, &ip.to_string()), l4) {
            _ if route.is_some() => route.map(|r| r.refusal(ip, ev.port)).unwrap_or_default(),
            (Some(special), _) => special,
            (None, Some(l4)) => decide::refusal(&self.desired, &scope, ip, ev.port, l4),
            (None, None) => format!(
                "{proto} is judged on pod veths and no ServiceEntry allows it (--tc-pass-icmp lets ICMP pass)"
            ),
        };
        let mut record = DenyRecord {
            time_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or_default(),
            verdict: "denied",
            namespace,
            pod: who.as_ref().and_then(|w| w.pod.clone()),
            labels: who.as_ref().map(|w| w.labels.clone()).unwrap_or_default(),
            sidecar: policy.and_then(|p| p.sidecar.clone()),
            pid: ev.pid,
            comm: String::from_utf8_lossy(ev.comm.split(|&b| b == 0).next().unwrap_or_default())
                .into_owned(),
            hook: hook_name(ev.hook),
            // The TC program sees packets, not processes: it names the veth where it can.
            cgroup: match (ev.hook, who.as_ref().and_then(|w| w.cgroup.as_ref())) {
                (hook::TC, _) if ev.cgroup_id != 0 => {
                    format!("(packet on the pod veth with ifindex {})", ev.cgroup_id)
                }
                (hook::TC, _) => "(packet on a pod veth)".to_string(),
                (_, Some(path)) => path.display().to_string(),
                (_, None) => ev.cgroup_id.to_string(),
            },
            dst: ip.to_string(),
            port: ev.port,
            proto,
            host,
            reason_code: reason_code(ev.reason),
            reason,
            learning: None,
            virtual_service: route.map(|r| r.virtual_service.clone()),
            gateway: route
                .map(|r| r.gateway.clone())
                .or_else(|| policy.and_then(|p| p.gateway.clone())),
        };
        if ev.reason == reason::NO_RULE && l4.is_some() {
            self.add_learning(&mut record, ev, policy.is_some_and(|p| !p.learn.is_empty()));
        }
        // Made before any destination: the socket's protocol, or nothing, in its place.
        if matches!(ev.hook, hook::SOCK_CREATE | hook::SETSOCKOPT) {
            record.dst = String::new();
            record.port = 0;
            record.host = None;
            record.proto = match ev.hook {
                hook::SOCK_CREATE => proto_name(ev.port),
                _ => String::new(),
            };
        }
        record
    }
}

impl Explainer {
    /// Says why what the scope learned from DNS answers did not allow the destination.
    fn add_learning(&self, record: &mut DenyRecord, ev: &DenyEvent, learns: bool) {
        let key = enforcer_common::PolicyKey {
            scope: ev.scope,
            port: ev.port,
            proto: ev.proto,
            pad: 0,
            addr: ev.addr,
        };
        let (code, why) = match &self.learning {
            Ok(handle) => match handle.why_refused(&key) {
                Some(not) => (not.code(), not.to_string()),
                None => return,
            },
            Err(off) if learns => (
                "learning_off",
                format!("learning from DNS answers is off: {off}"),
            ),
            Err(_) => return,
        };
        record.learning = Some(code);
        record.reason = format!("{}; {why}", record.reason);
    }
}

fn proto_name(protocol: u16) -> String {
    let l4 = u8::try_from(protocol).ok().and_then(L4::from_ip_proto);
    match (l4, protocol) {
        (Some(l4), _) => l4.to_string(),
        (None, 1) => "icmp".to_string(),
        (None, 58) => "icmpv6".to_string(),
        (None, 132) => "sctp".to_string(),
        (None, 136) => "udplite".to_string(),
        (None, 262) => "mptcp".to_string(),
        (None, other) => format!("ip-proto-{other}"),
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
            reason: 0,
            sock_type: 0,
            pad: 0,
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

    #[test]
    fn a_socket_refused_at_creation_names_its_kind_and_no_destination() {
        let mut ex = Explainer::default();
        ex.scopes.insert(3, "shop".into());
        let ev = DenyEvent {
            ts_ns: 0,
            cgroup_id: 9,
            scope: 3,
            pid: 7,
            comm: [0; 16],
            addr: [0; 16],
            port: 262,
            proto: 0,
            verdict: verdict::DENIED,
            hook: hook::SOCK_CREATE,
            reason: reason::SOCKET_TYPE,
            sock_type: 1,
            pad: 0,
        };
        let rec = ex.record(&ev);
        assert_eq!(
            (
                rec.hook,
                rec.reason_code,
                rec.proto.as_str(),
                rec.dst.as_str()
            ),
            ("sock_create", "socket_type", "mptcp", "")
        );
        assert!(rec.reason.starts_with("an MPTCP socket"), "{}", rec.reason);
        assert_eq!(rec.namespace, "shop");
    }

    #[test]
    fn a_printed_record_reads_back_and_other_lines_do_not() {
        let printed = DenyRecord {
            time_unix_ms: 5,
            verdict: "audit",
            namespace: "shop".into(),
            pod: Some("web-1".into()),
            hook: "connect4",
            dst: "203.0.113.10".into(),
            port: 443,
            proto: "tcp".into(),
            reason_code: "no_rule",
            reason: "why".into(),
            ..DenyRecord::default()
        };
        let line = serde_json::to_string(&printed).unwrap();
        let back = DenyRecord::from_line(&line).expect("its own record");
        assert_eq!(serde_json::to_string(&back).unwrap(), line);
        let edited = |from: &str, to: &str| DenyRecord::from_line(&line.replace(from, to));
        assert!(
            edited("\"audit\"", "\"allowed\"").is_none(),
            "unknown verdict"
        );
        assert!(
            edited("no_rule", "made_up").is_none(),
            "unknown reason code"
        );
        assert!(
            edited("203.0.113.10", "example.com").is_none(),
            "not an address"
        );
        assert!(
            edited("\"shop\"", "\"Shop: x\"").is_none(),
            "not a namespace"
        );
        assert!(DenyRecord::from_line("[2026-11-30T07:00:39Z INFO enforcer] applied").is_none());
    }
}
