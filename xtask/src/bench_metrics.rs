//! What serving metrics costs the agent: its CPU over 10 s without scrapes and over 10 s of
//! 10 scrapes a second, its RSS, and how long a scrape takes.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    bench::{median, rss_kib, Bench},
    bench_dns::{cpu_ticks, ticks_per_second},
};

const WINDOW: Duration = Duration::from_secs(10);
const SCRAPES_PER_SECOND: u32 = 10;

pub fn run(bench: &mut Bench) -> anyhow::Result<()> {
    bench.start_agent()?;
    let result = measure(bench);
    bench.stop_agent();
    result
}

fn measure(bench: &Bench) -> anyhow::Result<()> {
    let pid = bench.agent_pid().context("no agent")?;
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bench.work.join("status.json"))?)?;
    let addr = status["metrics_addr"]
        .as_str()
        .context("the agent serves no metrics")?
        .to_string();
    let idle = cpu_over(pid, || std::thread::sleep(WINDOW))?;
    let rss_idle = rss_kib(pid, "VmRSS:");
    let mut took = Vec::new();
    let mut bytes = 0;
    let scraped = cpu_over(pid, || {
        let start = Instant::now();
        while start.elapsed() < WINDOW {
            let t = Instant::now();
            if let Ok(n) = scrape(&addr) {
                took.push(t.elapsed().as_secs_f64() * 1e6);
                bytes = n;
            }
            std::thread::sleep(Duration::from_secs(1) / SCRAPES_PER_SECOND);
        }
    })?;
    println!(
        "\nthe agent serving metrics ({} s idle, then {} s of {SCRAPES_PER_SECOND} scrapes a second of {bytes} bytes):",
        WINDOW.as_secs(),
        WINDOW.as_secs()
    );
    println!(
        "  agent CPU: {:.2}% of a core idle, {:.2}% scraped; RSS {:.1} MiB idle, {:.1} MiB scraped; a scrape takes {:.0} us (median of {})",
        idle * 100.0,
        scraped * 100.0,
        rss_idle as f64 / 1024.0,
        rss_kib(pid, "VmRSS:") as f64 / 1024.0,
        median(&mut took),
        took.len()
    );
    Ok(())
}

/// The share of one core `pid` used while `work` ran.
fn cpu_over(pid: u32, work: impl FnOnce()) -> anyhow::Result<f64> {
    let (t0, start) = (cpu_ticks(pid)?, Instant::now());
    work();
    let ticks = cpu_ticks(pid)? - t0;
    Ok(ticks as f64 / ticks_per_second() / start.elapsed().as_secs_f64())
}

fn scrape(addr: &str) -> anyhow::Result<usize> {
    let mut stream = TcpStream::connect(addr)?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body)?;
    Ok(body.len())
}
