use std::{str::FromStr, time::Duration};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        rdata::{A, AAAA},
        Name, RData, Record, RecordType,
    },
};

use super::*;
use crate::{dns::host::Hosts, policy::L4};

const SEC: u64 = 1_000_000_000;

fn limits() -> Limits {
    Limits {
        life: Lifetime {
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(300),
            grace: Duration::from_secs(10),
        },
        max_ips: 3,
        max_per_scope: 100,
        deny: default_deny(),
        idle_grace_ns: 60 * SEC,
    }
}

fn scope(id: u32, hosts: &[&str], ports: &[(L4, u16)]) -> LearningScope {
    let mut h = Hosts::default();
    for host in hosts {
        h.insert(host);
    }
    LearningScope {
        id,
        name: format!("ns{id}"),
        rules: vec![LearnRule {
            hosts: h,
            ports: ports.to_vec(),
        }],
    }
}

fn learner(scopes: &[(u8, LearningScope)]) -> Learner<BTreeMap<PolicyKey, Learned>> {
    let mut l = Learner::new(BTreeMap::new(), limits());
    l.set_scopes(scopes.iter().cloned().collect());
    l
}

fn answer(qname: &str, ttl: u32, addrs: &[&str]) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(7)
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_response_code(ResponseCode::NoError);
    let name = Name::from_str(qname).unwrap();
    m.add_query(Query::query(name.clone(), RecordType::A));
    for a in addrs {
        let data = match a.parse::<IpAddr>().unwrap() {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        m.add_answer(Record::from_rdata(name.clone(), ttl, data));
    }
    m.to_vec().unwrap()
}

fn held(l: &Learner<BTreeMap<PolicyKey, Learned>>) -> Vec<(u32, String, u16, u64)> {
    l.store
        .iter()
        .map(|(k, v)| {
            (
                k.scope,
                crate::net::from_key_bytes(k.addr).to_string(),
                k.port,
                v.expires_ns / SEC,
            )
        })
        .collect()
}

#[test]
fn an_answer_is_written_for_the_scope_of_its_slot_on_the_entrys_ports_with_its_expiry() {
    let mut l = learner(&[
        (
            1,
            scope(10, &["*.example.com"], &[(L4::Tcp, 443), (L4::Tcp, 80)]),
        ),
        (2, scope(20, &["other.net"], &[(L4::Tcp, 443)])),
    ]);
    let n = l
        .learn(
            1,
            &answer("a.b.example.com.", 30, &["198.51.100.7", "2001:db8::7"]),
            1000 * SEC,
        )
        .unwrap();
    assert_eq!(n, 4);
    assert_eq!(
        held(&l),
        [
            (10, "198.51.100.7".to_string(), 80, 1040),
            (10, "2001:db8::7".to_string(), 80, 1040),
            (10, "198.51.100.7".to_string(), 443, 1040),
            (10, "2001:db8::7".to_string(), 443, 1040),
        ]
    );
    // The same answer reaching another scope's slot teaches that scope nothing.
    assert_eq!(
        l.learn(2, &answer("a.example.com.", 30, &["198.51.100.8"]), 0),
        Ok(0)
    );
    // A slot no scope holds learns nothing.
    assert_eq!(
        l.learn(9, &answer("a.example.com.", 30, &["198.51.100.8"]), 0),
        Ok(0)
    );
}

#[test]
fn loopback_link_local_metadata_and_mapped_addresses_are_never_learned() {
    let mut l = learner(&[(1, scope(10, &["*.example.com"], &[(L4::Tcp, 80)]))]);
    let bad = [
        "127.0.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "::ffff:198.51.100.1",
    ];
    for addr in bad {
        assert_eq!(
            l.learn(1, &answer("x.example.com.", 30, &[addr]), 0),
            Ok(0),
            "{addr}"
        );
    }
    assert!(l.is_empty());
}

#[test]
fn a_fresh_answer_extends_and_an_older_one_never_shortens() {
    let mut l = learner(&[(1, scope(10, &["cdn.example.com"], &[(L4::Tcp, 443)]))]);
    let q = |ttl| answer("cdn.example.com.", ttl, &["198.51.100.7"]);
    l.learn(1, &q(100), 0).unwrap();
    assert_eq!(held(&l)[0].3, 110);
    assert_eq!(l.learn(1, &q(5), 10 * SEC), Ok(0));
    assert_eq!(held(&l)[0].3, 110);
    l.learn(1, &q(300), 20 * SEC).unwrap();
    assert_eq!(held(&l)[0].3, 330);
}

#[test]
fn each_name_keeps_its_latest_addresses_up_to_the_cap() {
    let mut l = learner(&[(1, scope(10, &["*.example.com"], &[(L4::Tcp, 443)]))]);
    for i in 0..5u64 {
        let addr = format!("198.51.100.{}", 10 + i);
        l.learn(1, &answer("cdn.example.com.", 60, &[&addr]), i * SEC)
            .unwrap();
    }
    let addrs: Vec<String> = held(&l).into_iter().map(|h| h.1).collect();
    assert_eq!(addrs, ["198.51.100.12", "198.51.100.13", "198.51.100.14"]);
    // Another name has its own share.
    l.learn(1, &answer("api.example.com.", 60, &["198.51.100.50"]), 0)
        .unwrap();
    assert_eq!(l.len(), 4);
}

#[test]
fn a_flood_of_names_fills_only_its_scopes_share_and_then_is_refused() {
    let mut limits = limits();
    limits.max_per_scope = 3;
    let mut l = Learner::new(BTreeMap::new(), limits);
    l.set_scopes(
        [
            (1, scope(10, &["*.example.com"], &[(L4::Tcp, 443)])),
            (2, scope(20, &["*.example.com"], &[(L4::Tcp, 443)])),
        ]
        .into_iter()
        .collect(),
    );
    for i in 0..3 {
        let name = format!("r{i}.example.com.");
        l.learn(1, &answer(&name, 60, &[&format!("198.51.100.{i}")]), 0)
            .unwrap();
    }
    let err = l
        .learn(1, &answer("r9.example.com.", 60, &["198.51.100.9"]), 0)
        .unwrap_err();
    assert_eq!(err.kind(), "scope_full");
    // The other scope is not affected.
    assert_eq!(
        l.learn(2, &answer("r9.example.com.", 60, &["198.51.100.9"]), 0),
        Ok(1)
    );
    // Once the first scope's entries expire, it learns again.
    let later = 100 * SEC;
    assert_eq!(
        l.learn(1, &answer("r9.example.com.", 60, &["198.51.100.9"]), later),
        Ok(1)
    );
}

#[test]
fn a_failed_write_is_an_error_so_that_the_answer_is_not_released() {
    struct Full;
    impl Store for Full {
        fn put(&mut self, _: PolicyKey, _: Learned) -> Result<(), String> {
            Err("map full".into())
        }
        fn delete(&mut self, _: &PolicyKey) {}
    }
    let mut l = Learner::new(Full, limits());
    l.set_scopes(
        [(1, scope(10, &["a.example.com"], &[(L4::Tcp, 443)]))]
            .into_iter()
            .collect(),
    );
    let err = l
        .learn(1, &answer("a.example.com.", 60, &["198.51.100.7"]), 0)
        .unwrap_err();
    assert!(err.to_string().contains("map full"), "{err}");
    assert_eq!(l.failures.get("write"), Some(&1));
}

#[test]
fn entries_go_when_their_entry_or_scope_goes_or_long_after_expiry() {
    let mut l = learner(&[
        (1, scope(10, &["*.example.com"], &[(L4::Tcp, 443)])),
        (2, scope(20, &["*.example.com"], &[(L4::Tcp, 443)])),
    ]);
    l.learn(1, &answer("a.example.com.", 60, &["198.51.100.7"]), 0)
        .unwrap();
    l.learn(2, &answer("a.example.com.", 60, &["198.51.100.7"]), 0)
        .unwrap();
    // Scope 10 now declares another host only, on another port; scope 20 is unchanged.
    l.set_scopes(
        [
            (1, scope(10, &["a.example.com"], &[(L4::Tcp, 8443)])),
            (2, scope(20, &["*.example.com"], &[(L4::Tcp, 443)])),
        ]
        .into_iter()
        .collect(),
    );
    assert_eq!(held(&l).iter().map(|h| h.0).collect::<Vec<_>>(), [20]);
    // Expired at 70 s; kept for flows through the idle grace (60 s), then deleted.
    assert_eq!(l.expire(100 * SEC), 0);
    assert_eq!(l.expire(131 * SEC), 1);
    assert!(l.is_empty());
}

#[test]
fn a_refusal_says_why_learning_did_not_allow_it() {
    let mut l = learner(&[
        (1, scope(10, &["*.example.com"], &[(L4::Tcp, 443)])),
        (2, scope(20, &["*.other.net"], &[(L4::Tcp, 443)])),
    ]);
    l.learn(1, &answer("a.example.com.", 60, &["198.51.100.7"]), 0)
        .unwrap();
    l.learn(1, &answer("evil.test.", 60, &["198.51.100.8"]), 0)
        .unwrap();
    let key = |scope, addr: &str, port| PolicyKey {
        scope,
        port,
        proto: L4::Tcp.ip_proto(),
        pad: 0,
        addr: key_bytes(addr.parse().unwrap()),
    };
    let why = |k: PolicyKey, now| l.why_refused(&k, now).map(|w| w.code());
    assert_eq!(
        why(key(10, "198.51.100.7", 443), 100 * SEC),
        Some("expired")
    );
    assert_eq!(why(key(10, "198.51.100.7", 80), 0), Some("other_port"));
    assert_eq!(
        why(key(10, "198.51.100.8", 443), 0),
        Some("undeclared_name")
    );
    assert_eq!(why(key(20, "198.51.100.7", 443), 0), Some("other_scope"));
    assert_eq!(why(key(10, "198.51.100.9", 443), 0), Some("never_answered"));
    // A scope that does not learn gets no word on learning.
    assert_eq!(why(key(30, "198.51.100.9", 443), 0), None);
    let text = l
        .why_refused(&key(10, "198.51.100.8", 443), 0)
        .unwrap()
        .to_string();
    assert!(text.contains("answered for evil.test"), "{text}");
}

#[test]
fn names_go_with_their_last_entry_so_a_flood_leaves_nothing_behind() {
    let mut l = learner(&[(1, scope(10, &["*.example.com"], &[(L4::Tcp, 443)]))]);
    for i in 0..200u64 {
        let name = format!("r{i}.example.com.");
        l.learn(
            1,
            &answer(&name, 60, &[&format!("198.51.100.{}", i % 50)]),
            0,
        )
        .unwrap();
    }
    // Addresses are shared by several names: each key holds the name it was last learned for.
    assert_eq!(l.len(), 50);
    assert_eq!(l.names.len(), l.name_keys.len());
    assert!(l.names.len() <= 50, "{}", l.names.len());
    assert_eq!(l.expire(1000 * SEC), 50);
    assert!(l.names.is_empty() && l.name_of.is_empty() && l.name_keys.is_empty());
    assert!(l.scope_keys.is_empty());
}
