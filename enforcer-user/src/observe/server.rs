//! `/metrics`, `/healthz` and `/readyz` over HTTP, on loopback unless told otherwise (the
//! DaemonSet's probes and a Prometheus on the node reach it there).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::Metrics;

/// The address the agent serves on, once bound (the status file says it: `--metrics-addr`
/// with port 0 picks one).
pub static BOUND: std::sync::OnceLock<SocketAddr> = std::sync::OnceLock::new();

/// The loop has not come round for this long: not alive.
const STALLED_MS: u64 = 30_000;

/// What the probes ask: whether the loop turns, and whether the policy is in the kernel.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// Milliseconds since `started` at the loop's last turn.
    beat_ms: AtomicU64,
    applied: AtomicBool,
    failing: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            beat_ms: AtomicU64::new(0),
            applied: AtomicBool::new(false),
            failing: AtomicBool::new(false),
        }
    }
}

impl Health {
    pub fn beat(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.beat_ms.store(ms, Ordering::Relaxed);
    }

    /// After each apply: whether every entry went in.
    pub fn applied(&self, complete: bool) {
        self.applied.store(true, Ordering::Relaxed);
        self.failing.store(!complete, Ordering::Relaxed);
    }

    fn live(&self) -> Result<(), String> {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let since = now.saturating_sub(self.beat_ms.load(Ordering::Relaxed));
        if since > STALLED_MS {
            return Err(format!("the agent's loop has not turned for {since} ms"));
        }
        Ok(())
    }

    fn ready(&self) -> Result<(), String> {
        self.live()?;
        if !self.applied.load(Ordering::Relaxed) {
            return Err("no policy applied yet".into());
        }
        if self.failing.load(Ordering::Relaxed) {
            return Err(
                "the last apply left entries out (see the status file's apply_errors)".into(),
            );
        }
        Ok(())
    }
}

/// Binds `addr` and serves until the process ends; returns the address bound (port 0 picks
/// one).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let admission = super::admission::Admission::default();
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                // Out of descriptors, say: a pause, not a loop that eats a core.
                Err(err) => {
                    log::warn!("metrics: accepting a connection: {err}");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            };
            // Without a place, a connection is closed at once: slow clients cannot exhaust
            // the agent's descriptors, nor keep the probes out.
            let local = stream.local_addr().map_or(bound.ip(), |a| a.ip());
            let Some(ticket) = admission.admit(peer.ip(), local) else {
                continue;
            };
            let (metrics, health) = (Arc::clone(&metrics), Arc::clone(&health));
            let service = service_fn(move |req| {
                let answer = answer(&req, &metrics, &health);
                async move { Ok::<_, Infallible>(answer) }
            });
            tokio::spawn(async move {
                let connection = http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADERS_WITHIN)
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(CONNECTION_LIMIT, connection).await;
                drop(ticket);
            });
        }
    });
    Ok(bound)
}

/// A request's headers must arrive within this.
const HEADERS_WITHIN: Duration = Duration::from_secs(5);
/// No connection is kept longer, keep-alive or not.
const CONNECTION_LIMIT: Duration = Duration::from_secs(60);
/// After a failed accept.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

fn answer(req: &Request<Incoming>, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => match metrics.encode() {
            Ok(text) if wants_openmetrics(req) => (
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Ok(text) => (
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                super::text::classic(&text),
            ),
            Err(err) => (500, "text/plain", format!("encoding the metrics: {err}\n")),
        },
        "/healthz" => probe(health.live()),
        "/readyz" => probe(health.ready()),
        _ => (404, "text/plain", "/metrics, /healthz or /readyz\n".into()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert("content-type", value);
    }
    response
}

/// Prometheus asks for OpenMetrics; curl and promtool read the classic format.
fn wants_openmetrics(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all("accept")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

fn probe(result: Result<(), String>) -> (u16, &'static str, String) {
    match result {
        Ok(()) => (200, "text/plain", "ok\n".into()),
        Err(why) => (503, "text/plain", format!("{why}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_after_a_complete_apply() {
        let h = Health::default();
        h.beat();
        assert!(h.live().is_ok());
        assert_eq!(h.ready(), Err("no policy applied yet".to_string()));
        h.applied(false);
        assert!(h.ready().is_err_and(|e| e.contains("left entries out")));
        h.applied(true);
        assert!(h.ready().is_ok());
    }
}
