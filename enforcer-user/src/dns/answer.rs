//! The addresses a DNS response gives for the names asked, following CNAME chains inside it.
//! The name as asked is what a ServiceEntry must declare (so search-list expansions match as
//! the workload asked them), and an address lives for the shortest TTL along its chain.

use std::{collections::BTreeSet, net::IpAddr};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{RData, Record},
};

use super::host::normalize;

/// CNAMEs followed from a question before giving up (a loop, or a chain no resolver sends).
const MAX_CHAIN: usize = 8;

/// One address an answer gives for a name asked.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Answered {
    /// The question's name, normalized.
    pub name: String,
    pub addr: IpAddr,
    /// Seconds: the shortest along the chain.
    pub ttl: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnswerError {
    #[error("not a DNS message: {0}")]
    Malformed(String),
    #[error("a DNS query, not a response")]
    NotResponse,
}

/// What `response` answers. A response with an error code (NXDOMAIN, SERVFAIL) answers nothing.
pub fn addresses(response: &[u8]) -> Result<Vec<Answered>, AnswerError> {
    let message = Message::from_vec(response).map_err(|e| AnswerError::Malformed(e.to_string()))?;
    if message.message_type() != MessageType::Response {
        return Err(AnswerError::NotResponse);
    }
    if message.response_code() != ResponseCode::NoError {
        return Ok(Vec::new());
    }
    let records = message.answers();
    let mut out = BTreeSet::new();
    for query in message.queries() {
        let asked = normalize(&query.name().to_ascii());
        follow(records, &asked, &mut out);
    }
    Ok(out.into_iter().collect())
}

/// Adds the addresses at the end of `asked`'s chain.
fn follow(records: &[Record], asked: &str, out: &mut BTreeSet<Answered>) {
    let mut current = asked.to_string();
    let mut ttl = u32::MAX;
    let mut seen = BTreeSet::new();
    for _ in 0..=MAX_CHAIN {
        if !seen.insert(current.clone()) {
            return;
        }
        let here = records
            .iter()
            .filter(|r| normalize(&r.name().to_ascii()) == current);
        let mut next = None;
        for record in here {
            let addr = match record.data() {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                RData::CNAME(target) => {
                    next = Some((normalize(&target.0.to_ascii()), record.ttl()));
                    continue;
                }
                _ => continue,
            };
            out.insert(Answered {
                name: asked.to_string(),
                addr,
                ttl: ttl.min(record.ttl()),
            });
        }
        match next {
            Some((target, hop_ttl)) => {
                current = target;
                ttl = ttl.min(hop_ttl);
            }
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query, ResponseCode},
        rr::{
            rdata::{A, AAAA, CNAME},
            Name, RData, Record, RecordType,
        },
    };

    use super::*;

    fn name(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    fn response(questions: &[(&str, RecordType)], answers: Vec<Record>) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(7)
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query)
            .set_response_code(ResponseCode::NoError);
        for (q, t) in questions {
            m.add_query(Query::query(name(q), *t));
        }
        m.add_answers(answers);
        m.to_vec().unwrap()
    }

    fn a(owner: &str, ttl: u32, ip: &str) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(ip.parse().unwrap())))
    }

    fn cname(owner: &str, ttl: u32, target: &str) -> Record {
        Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
    }

    fn got(bytes: &[u8]) -> Vec<(String, String, u32)> {
        addresses(bytes)
            .unwrap()
            .into_iter()
            .map(|a| (a.name, a.addr.to_string(), a.ttl))
            .collect()
    }

    #[test]
    fn a_cname_chain_gives_its_addresses_to_the_name_asked_with_the_shortest_ttl() {
        let bytes = response(
            &[("pypi.org.", RecordType::A)],
            vec![
                cname("pypi.org.", 300, "dualstack.python.map.fastly.net."),
                cname("dualstack.python.map.fastly.net.", 30, "edge.fastly.net."),
                a("edge.fastly.net.", 60, "198.51.100.7"),
                a("edge.fastly.net.", 10, "198.51.100.8"),
                // Not on the chain: a resolver's extra, or a forgery.
                a("other.example.", 60, "203.0.113.9"),
            ],
        );
        assert_eq!(
            got(&bytes),
            [
                ("pypi.org".into(), "198.51.100.7".into(), 30),
                ("pypi.org".into(), "198.51.100.8".into(), 10),
            ]
        );
    }

    #[test]
    fn several_questions_aaaa_and_case_are_each_answered() {
        let bytes = response(
            &[
                ("A.Example.COM.", RecordType::A),
                ("b.example.com.", RecordType::AAAA),
            ],
            vec![
                a("a.example.com.", 60, "198.51.100.1"),
                Record::from_rdata(
                    name("B.example.com."),
                    120,
                    RData::AAAA(AAAA("2001:db8::1".parse().unwrap())),
                ),
            ],
        );
        assert_eq!(
            got(&bytes),
            [
                ("a.example.com".into(), "198.51.100.1".into(), 60),
                ("b.example.com".into(), "2001:db8::1".into(), 120),
            ]
        );
    }

    #[test]
    fn a_cname_loop_ends_and_errors_answer_nothing() {
        let looped = response(
            &[("x.example.", RecordType::A)],
            vec![
                cname("x.example.", 60, "y.example."),
                cname("y.example.", 60, "x.example."),
            ],
        );
        assert!(got(&looped).is_empty());
        let mut m = Message::new();
        m.set_message_type(MessageType::Response)
            .set_response_code(ResponseCode::NXDomain)
            .add_query(Query::query(name("gone.example."), RecordType::A));
        assert!(got(&m.to_vec().unwrap()).is_empty());
    }

    #[test]
    fn queries_and_garbage_are_refused() {
        let mut q = Message::new();
        q.set_message_type(MessageType::Query)
            .add_query(Query::query(name("a.example."), RecordType::A));
        assert_eq!(
            addresses(&q.to_vec().unwrap()),
            Err(AnswerError::NotResponse)
        );
        assert!(matches!(
            addresses(&[1, 2, 3]),
            Err(AnswerError::Malformed(_))
        ));
    }
}
