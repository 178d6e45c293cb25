//! The HTTP sides of the Envoy benchmark (`bench_envoy`), run as `bench-client` processes so that
//! a client can run inside an enforced cgroup and the server inside the test hosts' namespace:
//!
//! - `http-serve ADDR`: the test host's server (`enforcer_testkit::http`); prints `ready`.
//! - `http ADDR HOST N close|keep-alive`: N sequential `GET /` with `Host: HOST`, a connection
//!   each or one for all; prints JSON with the rate, p50/p99 latency and its own CPU time.
//! - `refused ADDR`: prints `refused` if the kernel refuses a connect (EPERM), else `allowed`.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};

/// What the test host answers: small, fixed, so every variant moves the same bytes.
const BODY: &str = "hello from the bench host\n";

pub fn client(mode: &str, rest: &[String]) -> anyhow::Result<()> {
    match (mode, rest) {
        ("http-serve", [addr]) => {
            let listener =
                TcpListener::bind(addr.as_str()).with_context(|| format!("binding {addr}"))?;
            println!("ready");
            enforcer_testkit::http::serve(&listener, BODY);
            Ok(())
        }
        ("http", [addr, host, n, conn]) => {
            let keep_alive = match conn.as_str() {
                "close" => false,
                "keep-alive" => true,
                other => bail!("close or keep-alive, not {other}"),
            };
            let report = requests(addr.parse()?, host, n.parse()?, keep_alive)?;
            println!("{report}");
            Ok(())
        }
        ("refused", [addr]) => {
            let addr: SocketAddr = addr.parse()?;
            let refused = matches!(
                TcpStream::connect_timeout(&addr, Duration::from_secs(2)),
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied
            );
            println!("{}", if refused { "refused" } else { "allowed" });
            Ok(())
        }
        _ => bail!(
            "usage: bench-client http-serve ADDR | http ADDR HOST N close|keep-alive | refused ADDR"
        ),
    }
}

/// N requests one after another; each latency is from connect (or write, on a kept connection)
/// to the last byte of the answer.
fn requests(
    addr: SocketAddr,
    host: &str,
    n: usize,
    keep_alive: bool,
) -> anyhow::Result<serde_json::Value> {
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: enforcer-bench\r\n{}\r\n",
        if keep_alive {
            ""
        } else {
            "Connection: close\r\n"
        }
    );
    let mut latencies = Vec::with_capacity(n);
    let mut kept: Option<BufReader<TcpStream>> = None;
    let cpu_before = cpu_time()?;
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let mut conn = match kept.take() {
            Some(c) => c,
            None => BufReader::new(connect(addr)?),
        };
        conn.get_mut().write_all(request.as_bytes())?;
        let status = read_response(&mut conn)
            .with_context(|| format!("request {i} to {addr} (Host: {host})"))?;
        ensure!(
            status == 200,
            "request {i} to {addr} (Host: {host}): status {status}"
        );
        if keep_alive {
            kept = Some(conn);
        } else {
            // The server closes first: wait for its FIN, so that TIME_WAIT stays on its side
            // and thousands of requests do not use up this side's ephemeral ports.
            let mut rest = [0u8; 64];
            ensure!(conn.read(&mut rest)? == 0, "data after the answer");
        }
        latencies.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_time()? - cpu_before;
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| {
        latencies
            .get(((n as f64 * q) as usize).min(n.saturating_sub(1)))
            .copied()
    };
    Ok(serde_json::json!({
        "requests": n,
        "secs": secs,
        "p50_us": at(0.5),
        "p99_us": at(0.99),
        "cpu_secs": cpu,
    }))
}

fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

/// Reads one answer (status line, headers, a Content-Length body); returns the status.
fn read_response(conn: &mut BufReader<TcpStream>) -> anyhow::Result<u16> {
    let mut line = String::new();
    ensure!(conn.read_line(&mut line)? > 0, "closed before answering");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP answer: {line:?}"))?;
    let mut length = 0usize;
    loop {
        line.clear();
        ensure!(conn.read_line(&mut line)? > 0, "closed in the headers");
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse()?;
            }
        }
    }
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body)?;
    Ok(status)
}

/// This process's user and system CPU time, in seconds (getrusage: microsecond resolution,
/// unlike /proc's clock ticks).
fn cpu_time() -> anyhow::Result<f64> {
    // SAFETY: getrusage fills the struct it is given; a zeroed rusage is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage this function owns.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    ensure!(rc == 0, "getrusage: {}", std::io::Error::last_os_error());
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(secs(usage.ru_utime) + secs(usage.ru_stime))
}
