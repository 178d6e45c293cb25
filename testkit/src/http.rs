//! A tiny HTTP/1.1 server and client on std threads, for tests and the benchmark: a fixed answer
//! at a small, steady cost per request (unlike python3's http.server, whose cost would dominate
//! what the benchmark measures), keep-alive when the client wants it.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{bail, Context as _};

/// Serves `GET` on a thread per connection until dropped; every answer is 200 with `body`.
pub struct HttpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Listens on `addr` (port 0 picks one).
    pub fn start(addr: SocketAddr, body: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, body) = (stop.clone(), body.to_string());
        let thread = std::thread::spawn(move || accept_loop(&listener, &body, &flag));
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves on `listener` until the process ends (the benchmark runs it in a network namespace).
pub fn serve(listener: &TcpListener, body: &str) {
    accept_loop(listener, body, &AtomicBool::new(false));
}

fn accept_loop(listener: &TcpListener, body: &str, stop: &AtomicBool) {
    let response: Arc<[u8]> = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
    .into();
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let response = response.clone();
        std::thread::spawn(move || {
            let _ = connection(stream, &response);
        });
    }
}

/// Answers each request on the connection until the client closes or asks to.
fn connection(stream: TcpStream, response: &[u8]) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut close = line.trim_end().ends_with("HTTP/1.0");
        // The headers, up to the empty line; GET has no body.
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let header = line.trim_end().to_ascii_lowercase();
            if header.is_empty() {
                break;
            }
            if header == "connection: close" {
                close = true;
            }
        }
        writer.write_all(response)?;
        if close {
            return writer.shutdown(Shutdown::Write);
        }
    }
}

/// `GET path` with `Host: host` on a connection of its own: the status and the body.
pub fn get(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: enforcer-test\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("reading the answer from {addr}"))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let Some(status) = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
    else {
        bail!("{addr} answered no HTTP status: {response:?}");
    };
    Ok((status, body.to_string()))
}
