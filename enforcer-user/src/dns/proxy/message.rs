//! The little the proxy needs to know of DNS messages besides what `answer` reads: whether a
//! reply answers a query, and a SERVFAIL for a query.

use hickory_proto::op::{Message, MessageType, ResponseCode};

/// Whether `reply` is a response to `query`: same id, same questions (names compared without
/// case, as resolvers may randomize it).
pub fn answers(query: &[u8], reply: &[u8]) -> bool {
    let (Ok(q), Ok(r)) = (Message::from_vec(query), Message::from_vec(reply)) else {
        return false;
    };
    let same = |a: &hickory_proto::op::Query, b: &hickory_proto::op::Query| {
        a.query_type() == b.query_type()
            && a.query_class() == b.query_class()
            && a.name()
                .to_ascii()
                .eq_ignore_ascii_case(&b.name().to_ascii())
    };
    r.message_type() == MessageType::Response
        && r.id() == q.id()
        && r.queries().len() == q.queries().len()
        && q.queries().iter().zip(r.queries()).all(|(a, b)| same(a, b))
}

/// SERVFAIL for `query`: the resolver tries its next server, or reports a temporary failure.
/// `None` for bytes that are no query at all.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    if q.message_type() != MessageType::Query {
        return None;
    }
    let mut r = Message::new();
    r.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(q.op_code())
        .set_recursion_desired(q.recursion_desired())
        .set_response_code(ResponseCode::ServFail);
    r.add_queries(q.queries().to_vec());
    r.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use hickory_proto::{
        op::{Message, MessageType, Query},
        rr::{Name, RecordType},
    };

    use super::*;

    fn query(id: u16, name: &str) -> Message {
        let mut m = Message::new();
        m.set_id(id).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
        m
    }

    #[test]
    fn a_reply_answers_only_its_own_query() {
        let q = query(7, "a.example.com.");
        let mut r = q.clone();
        r.set_message_type(MessageType::Response);
        let q = q.to_vec().unwrap();
        assert!(answers(&q, &r.to_vec().unwrap()));
        let other_id = {
            let mut m = r.clone();
            m.set_id(8);
            m.to_vec().unwrap()
        };
        assert!(!answers(&q, &other_id));
        let other_name = {
            let mut m = query(7, "b.example.com.");
            m.set_message_type(MessageType::Response);
            m.to_vec().unwrap()
        };
        assert!(!answers(&q, &other_name));
        let upper = {
            let mut m = query(7, "A.Example.COM.");
            m.set_message_type(MessageType::Response);
            m.to_vec().unwrap()
        };
        assert!(answers(&q, &upper));
        // A query is no answer, and garbage is none either.
        assert!(!answers(&q, &q));
        assert!(!answers(&q, b"\x00\x07garbage"));
    }

    #[test]
    fn servfail_keeps_the_id_and_question() {
        let q = query(42, "a.example.com.").to_vec().unwrap();
        let r = Message::from_vec(&servfail(&q).unwrap()).unwrap();
        assert_eq!(r.id(), 42);
        assert_eq!(r.response_code(), ResponseCode::ServFail);
        assert!(answers(&q, &r.to_vec().unwrap()));
        assert!(servfail(b"junk").is_none());
    }
}
