use std::net::UdpSocket;

use hickory_proto::op::{Message, MessageType, ResponseCode};

use super::*;

/// A DNS server on loopback that answers every query with `code` and no records, for at most
/// 20 queries or 10 s.
fn answering(code: ResponseCode) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("binding a loopback port");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout");
    let addr = socket.local_addr().expect("its address");
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        for _ in 0..20 {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                return;
            };
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut answer = Message::new();
            answer
                .set_id(query.id())
                .set_message_type(MessageType::Response)
                .set_recursion_available(true)
                .set_response_code(code)
                .add_queries(query.queries().to_vec());
            if let Ok(bytes) = answer.to_vec() {
                let _ = socket.send_to(&bytes, from);
            }
        }
    });
    addr
}

fn resolver(server: SocketAddr) -> Resolver {
    Resolver::new(DnsSettings {
        server: Some(server),
        lifetimes: Lifetimes::default(),
    })
    .expect("a resolver")
}

#[tokio::test]
async fn servfail_keeps_the_last_answer_and_nxdomain_empties_it() {
    let name = "api.example.com".to_string();
    let known: IpAddr = "203.0.113.10".parse().unwrap();
    let wanted = BTreeSet::from([name.clone()]);

    let mut r = resolver(answering(ResponseCode::ServFail));
    r.start(&wanted);
    r.record(name.clone(), Ok((vec![known], Duration::from_secs(60))));
    let failed = lookup(&r.inner, &name).await;
    assert_eq!(
        failed.as_ref().map_err(|e| e.kind),
        Err(LookupFailure::ServFail),
        "{failed:?}"
    );
    let report = r.record(name.clone(), failed);
    assert!(!report.changed && report.errors.len() == 1, "{report:?}");
    assert_eq!(r.answers[&name].current(), [known], "the last answer stays");

    let mut r = resolver(answering(ResponseCode::NXDomain));
    r.start(&wanted);
    r.record(name.clone(), Ok((vec![known], Duration::from_secs(60))));
    let gone = lookup(&r.inner, &name).await;
    assert_eq!(gone, Ok((Vec::new(), Duration::ZERO)));
    r.record(name.clone(), gone);
    assert!(r.answers[&name].current().is_empty(), "the name is gone");
}

#[tokio::test]
async fn refused_is_a_failure_of_its_own_kind() {
    let r = resolver(answering(ResponseCode::Refused));
    let result = lookup(&r.inner, "api.example.com").await;
    assert_eq!(result.map_err(|e| e.kind), Err(LookupFailure::Refused));
}
