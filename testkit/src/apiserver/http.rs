//! The HTTP side of the fake API server: discovery, paged lists and chunked watches.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::bail;
use serde_json::{json, Value};

use super::{Kind, Shared};

pub(super) fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3600);
    while !shared.stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        match listener.accept() {
            Ok((stream, _)) => {
                let s = Arc::clone(&shared);
                conns.push(std::thread::spawn(move || {
                    let _ = serve(stream, &s);
                }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => break,
        }
        conns.retain(|c| !c.is_finished());
    }
    for c in conns {
        let _ = c.join();
    }
}

struct Request {
    path: String,
    query: BTreeMap<String, String>,
}

fn read_request(stream: &TcpStream) -> anyhow::Result<Request> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" || header == "\n" {
            break;
        }
    }
    if method != "GET" {
        bail!("method {method} not allowed: the agent only reads");
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), decode(v))
        })
        .collect();
    Ok(Request {
        path: path.to_string(),
        query,
    })
}

/// Percent-decoding, enough for selectors and tokens.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve(mut stream: TcpStream, shared: &Shared) -> anyhow::Result<()> {
    let req = match read_request(&stream) {
        Ok(r) => r,
        Err(err) => {
            return respond(
                &mut stream,
                405,
                &status(405, "MethodNotAllowed", &err.to_string()),
            )
        }
    };
    let segs: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    // Discovery.
    let discovery = {
        let st = shared.lock();
        discovery(&st.kinds, &segs)
    };
    if let Some(body) = discovery {
        shared.lock().requests.push(format!("GET {}", req.path));
        return respond(&mut stream, 200, &body);
    }
    let Some((kind, namespace)) = collection(&shared.lock().kinds, &segs) else {
        let body = status(
            404,
            "NotFound",
            &format!("the server could not find {}", req.path),
        );
        return respond(&mut stream, 404, &body);
    };
    let filter = Filter::new(
        namespace,
        req.query.get("fieldSelector").map(String::as_str),
    );
    if matches!(
        req.query.get("watch").map(String::as_str),
        Some("true" | "1")
    ) {
        watch(&mut stream, shared, kind, &filter, &req)
    } else {
        list(&mut stream, shared, kind, &filter, &req)
    }
}

fn discovery(kinds: &[Kind], segs: &[&str]) -> Option<Value> {
    let resources = |group: &str, version: &str| {
        let list: Vec<Value> = kinds
            .iter()
            .filter(|k| k.group == group && k.version == version)
            .map(|k| {
                json!({"name": k.plural, "singularName": k.kind.to_lowercase(), "namespaced": k.namespaced,
                       "kind": k.kind, "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]})
            })
            .collect();
        let gv = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list})
    };
    let group_versions = |group: &str| {
        let mut versions: Vec<&str> = kinds
            .iter()
            .filter(|k| k.group == group)
            .map(|k| k.version.as_str())
            .collect();
        versions.dedup();
        let versions: Vec<Value> = versions
            .iter()
            .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
            .collect();
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": group,
               "versions": versions, "preferredVersion": versions.first()})
    };
    match segs {
        ["api"] => Some(json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}]})),
        ["api", "v1"] => Some(resources("", "v1")),
        ["apis"] => {
            let mut groups: Vec<&str> = kinds
                .iter()
                .filter(|k| !k.group.is_empty())
                .map(|k| k.group.as_str())
                .collect();
            groups.dedup();
            let groups: Vec<Value> = groups.iter().map(|g| group_versions(g)).collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        ["apis", group] if kinds.iter().any(|k| k.group == *group) => Some(group_versions(group)),
        ["apis", group, version]
            if kinds
                .iter()
                .any(|k| k.group == *group && k.version == *version) =>
        {
            Some(resources(group, version))
        }
        _ => None,
    }
}

/// The kind and namespace of a collection path.
fn collection(kinds: &[Kind], segs: &[&str]) -> Option<(usize, Option<String>)> {
    let (group, version, rest) = match segs {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, plural) = match rest {
        ["namespaces", ns, plural] => (Some(ns.to_string()), *plural),
        [plural] => (None, *plural),
        _ => return None,
    };
    let kind = kinds
        .iter()
        .position(|k| k.group == group && k.version == version && k.plural == plural)?;
    Some((kind, namespace))
}

struct Filter {
    namespace: Option<String>,
    fields: Vec<(String, String)>,
}

impl Filter {
    fn new(namespace: Option<String>, selector: Option<&str>) -> Self {
        let fields = selector
            .unwrap_or_default()
            .split(',')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim_end_matches('=').to_string(), v.to_string()))
            .collect();
        Self { namespace, fields }
    }

    fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            if obj["metadata"]["namespace"].as_str() != Some(ns) {
                return false;
            }
        }
        self.fields.iter().all(|(path, want)| {
            let pointer = format!("/{}", path.replace('.', "/"));
            obj.pointer(&pointer)
                .and_then(Value::as_str)
                .unwrap_or_default()
                == want
        })
    }
}

fn list(
    stream: &mut TcpStream,
    shared: &Shared,
    kind: usize,
    filter: &Filter,
    req: &Request,
) -> anyhow::Result<()> {
    let mut st = shared.lock();
    st.requests.push(format!("LIST {}", req.path));
    let k = st.kinds[kind].clone();
    let items: Vec<Value> = st
        .objects
        .iter()
        .filter(|((i, _, _), obj)| *i == kind && filter.matches(obj))
        .map(|(_, obj)| item_of(&k, obj))
        .collect();
    let rv = st.rv;
    drop(st);
    let offset: usize = req
        .query
        .get("continue")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let limit: usize = req
        .query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|&l| l > 0)
        .unwrap_or(usize::MAX);
    let page: Vec<Value> = items.iter().skip(offset).take(limit).cloned().collect();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if offset.saturating_add(limit) < items.len() {
        metadata["continue"] = json!((offset + limit).to_string());
        metadata["remainingItemCount"] = json!(items.len() - offset - limit);
    }
    let body = json!({"kind": format!("{}List", k.kind), "apiVersion": k.api_version(),
                      "metadata": metadata, "items": page});
    respond(stream, 200, &body)
}

/// Built-in lists leave out their items' type, as the real server does; custom resources keep it.
fn item_of(kind: &Kind, obj: &Value) -> Value {
    let mut item = obj.clone();
    if !kind.group.contains('.') || kind.group.ends_with(".k8s.io") {
        if let Some(map) = item.as_object_mut() {
            map.remove("apiVersion");
            map.remove("kind");
        }
    }
    item
}

fn watch(
    stream: &mut TcpStream,
    shared: &Shared,
    kind: usize,
    filter: &Filter,
    req: &Request,
) -> anyhow::Result<()> {
    let since: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = req.query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(300), Duration::from_secs);
    stream.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )?;
    let mut st = shared.lock();
    let k = st.kinds[kind].clone();
    if since < st.oldest {
        st.requests.push(format!("GONE {} rv={since}", req.path));
        drop(st);
        let gone = status(
            410,
            "Expired",
            &format!("too old resource version: {since}"),
        );
        send_event(stream, &json!({"type": "ERROR", "object": gone}))?;
        return end_chunks(stream);
    }
    st.requests.push(format!("WATCH {} rv={since}", req.path));
    let epoch = st.epoch;
    let deadline = Instant::now() + timeout;
    let mut sent = since;
    loop {
        // Checked before anything is sent: a watch that was ended delivers nothing more, so
        // changes made after `drop_watches` reach clients only by a new watch or a relist.
        if st.epoch != epoch || shared.stop.load(Ordering::SeqCst) || Instant::now() >= deadline {
            drop(st);
            return end_chunks(stream);
        }
        let pending: Vec<Value> = st
            .history
            .iter()
            .filter(|e| e.rv > sent && e.kind == kind && filter.matches(&e.object))
            .map(|e| json!({"type": e.kind_name, "object": e.object}))
            .collect();
        let newest = st.rv;
        drop(st);
        for event in &pending {
            send_event(stream, event)?;
        }
        sent = sent.max(newest);
        st = shared.lock();
        if st.rv > sent || st.epoch != epoch {
            continue;
        }
        let (guard, waited) = shared
            .changed
            .wait_timeout(st, shared.bookmark_every)
            .unwrap_or_else(|p| p.into_inner());
        st = guard;
        if waited.timed_out() && bookmarks && st.rv == sent && st.epoch == epoch {
            let rv = st.rv;
            drop(st);
            let mark = json!({"type": "BOOKMARK", "object": {"kind": k.kind, "apiVersion": k.api_version(),
                              "metadata": {"resourceVersion": rv.to_string()}}});
            send_event(stream, &mark)?;
            st = shared.lock();
        }
    }
}

/// One event as a JSON line, split across two chunks so that clients must reassemble it.
fn send_event(stream: &mut TcpStream, event: &Value) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(event)?;
    line.push(b'\n');
    let (a, b) = line.split_at(line.len() / 2);
    for part in [a, b] {
        write!(stream, "{:x}\r\n", part.len())?;
        stream.write_all(part)?;
        stream.write_all(b"\r\n")?;
    }
    stream.flush()?;
    Ok(())
}

fn end_chunks(stream: &mut TcpStream) -> anyhow::Result<()> {
    stream.write_all(b"0\r\n\r\n")?;
    stream.flush()?;
    Ok(())
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> anyhow::Result<()> {
    let body = serde_json::to_vec(body)?;
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(&body)?;
    stream.flush()?;
    Ok(())
}
