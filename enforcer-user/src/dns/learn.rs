//! What an answer allows a scope: the answered addresses of the names its visible
//! ServiceEntries declare, on those entries' ports, until the TTL (clamped) and the grace
//! period have passed. Pure, so that every rule is tested without a kernel.

use std::{collections::BTreeMap, time::Duration};

use super::{answer::Answered, host::Hosts};
use crate::policy::{Rule, L4};

/// How long a learned address lives, as for the agent's own lookups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub grace: Duration,
}

impl Lifetime {
    /// Seconds from the answer to the address's expiry.
    pub fn of(&self, ttl: u32) -> u64 {
        let ttl = Duration::from_secs(ttl.into()).clamp(self.min_ttl, self.max_ttl);
        (ttl + self.grace).as_secs()
    }
}

/// Names that learn, and the ports their addresses open: one per ServiceEntry (or a set of
/// entries with the same ports).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LearnRule {
    pub hosts: Hosts,
    pub ports: Vec<(L4, u16)>,
}

/// An address a scope may now reach on one port, and until when (seconds since the epoch).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Grant {
    pub rule: Rule,
    pub name: String,
    pub expires: u64,
}

/// The grants that `answers` give a scope with these learn rules, at `now` (seconds since the
/// epoch). At most `max_ips` addresses per name are taken from one answer, the first ones.
pub fn grants(
    rules: &[LearnRule],
    answers: &[Answered],
    now: u64,
    life: &Lifetime,
    max_ips: usize,
) -> Vec<Grant> {
    let mut per_name: BTreeMap<&str, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for answer in answers {
        let matching: Vec<&LearnRule> = rules
            .iter()
            .filter(|r| r.hosts.covers(&answer.name))
            .collect();
        if matching.is_empty() {
            continue;
        }
        let taken = per_name.entry(&answer.name).or_default();
        if *taken >= max_ips {
            continue;
        }
        *taken += 1;
        let expires = now + life.of(answer.ttl);
        for rule in matching {
            for &(l4, port) in &rule.ports {
                out.push(Grant {
                    rule: Rule::host(l4, port, answer.addr),
                    name: answer.name.clone(),
                    expires,
                });
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIFE: Lifetime = Lifetime {
        min_ttl: Duration::from_secs(5),
        max_ttl: Duration::from_secs(300),
        grace: Duration::from_secs(120),
    };

    fn rule(hosts: &[&str], ports: &[(L4, u16)]) -> LearnRule {
        let mut h = Hosts::default();
        for host in hosts {
            h.insert(host);
        }
        LearnRule {
            hosts: h,
            ports: ports.to_vec(),
        }
    }

    fn answered(name: &str, addr: &str, ttl: u32) -> Answered {
        Answered {
            name: name.into(),
            addr: addr.parse().unwrap(),
            ttl,
        }
    }

    #[test]
    fn an_answer_for_a_declared_name_opens_its_ports_until_ttl_and_grace() {
        let rules = [rule(&["*.wikipedia.org"], &[(L4::Tcp, 443), (L4::Tcp, 80)])];
        let got = grants(
            &rules,
            &[answered("en.wikipedia.org", "198.51.100.5", 60)],
            1000,
            &LIFE,
            10,
        );
        assert_eq!(
            got.iter()
                .map(|g| (g.rule.port, g.expires))
                .collect::<Vec<_>>(),
            [(80, 1180), (443, 1180)]
        );
        assert!(got
            .iter()
            .all(|g| g.rule.is_exact() && g.name == "en.wikipedia.org"));
    }

    #[test]
    fn undeclared_names_and_the_wildcards_apex_learn_nothing() {
        let rules = [rule(&["*.wikipedia.org"], &[(L4::Tcp, 443)])];
        let answers = [
            answered("wikipedia.org", "198.51.100.5", 60),
            answered("evil.example", "198.51.100.6", 60),
        ];
        assert!(grants(&rules, &answers, 0, &LIFE, 10).is_empty());
    }

    #[test]
    fn ttls_are_clamped_and_addresses_per_name_capped() {
        let rules = [rule(&["cdn.example.com"], &[(L4::Tcp, 443)])];
        let answers = [
            answered("cdn.example.com", "198.51.100.1", 0),
            answered("cdn.example.com", "198.51.100.2", 86_400),
            answered("cdn.example.com", "198.51.100.3", 60),
        ];
        let got = grants(&rules, &answers, 0, &LIFE, 2);
        let seen: Vec<_> = got
            .iter()
            .map(|g| (g.rule.net.addr().to_string(), g.expires))
            .collect();
        assert_eq!(
            seen,
            [
                ("198.51.100.1".to_string(), 125),
                ("198.51.100.2".to_string(), 420),
            ]
        );
    }
}
