//! Which hosts of a ServiceEntry learn addresses from workloads' own DNS answers (issue 14),
//! and on which ports: where the entry leaves its addresses to DNS. An entry with `addresses`,
//! endpoints or STATIC resolution names its addresses itself; learning there would widen it.
//!
//! | resolution                          | learns | ports                      |
//! |-------------------------------------|--------|----------------------------|
//! | NONE without `addresses` (wildcards)| yes    | the port numbers           |
//! | DNS, DNS_ROUND_ROBIN, no endpoints  | yes    | number and `targetPort`    |
//! | STATIC, or any with endpoints       | no     |                            |

use super::{compile::port_numbers, is_opaque_tcp, l4_of_protocol, L4};
use crate::{
    dns::{host::Hosts, learn::LearnRule},
    istio::{Resolution, ServiceEntry},
};

/// One port of an entry whose hosts learn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryLearning<'a> {
    pub l4: L4,
    /// The service port, which Sidecar imports are matched on.
    pub service_port: u16,
    /// The ports learned addresses open.
    pub ports: Vec<u16>,
    pub hosts: Vec<&'a str>,
}

impl EntryLearning<'_> {
    /// The learn rule of the hosts that `imported` lets a scope have; `None` without any.
    pub fn rule_for(&self, imported: impl Fn(&str) -> bool) -> Option<LearnRule> {
        let mut hosts = Hosts::default();
        for host in self.hosts.iter().filter(|h| imported(h)) {
            hosts.insert(host);
        }
        (!hosts.is_empty()).then(|| LearnRule {
            hosts,
            ports: self.ports.iter().map(|&p| (self.l4, p)).collect(),
        })
    }
}

/// The learning `se` asks for; `has_endpoints` when it has endpoints or a workloadSelector.
pub fn entry_learning(
    se: &ServiceEntry,
    has_endpoints: bool,
    istio_compat: bool,
) -> Vec<EntryLearning<'_>> {
    let spec = &se.spec;
    let learns = match spec.resolution {
        Resolution::None => spec.addresses.is_empty(),
        Resolution::Dns | Resolution::DnsRoundRobin => !has_endpoints,
        Resolution::Static => false,
    };
    if !learns {
        return Vec::new();
    }
    spec.ports
        .iter()
        .filter_map(|port| {
            let l4 = l4_of_protocol(port.protocol.as_deref())?;
            // `--istio-compat` allows every address on such a port already.
            let none = spec.resolution == Resolution::None;
            if istio_compat && none && is_opaque_tcp(port.protocol.as_deref()) {
                return None;
            }
            let (number, target) = port_numbers(port);
            let ports = if !none && target != number {
                vec![number, target]
            } else {
                vec![number]
            };
            Some(EntryLearning {
                l4,
                service_port: number,
                ports,
                hosts: spec.hosts.iter().map(String::as_str).collect(),
            })
        })
        .collect()
}
