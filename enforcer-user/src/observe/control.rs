//! The agent's local control socket, which `enforcer events`, `explain` and `audit-report` ask:
//! one JSON request line in, JSON lines out. It is a unix socket that only root may open
//! (mode 0600), since records name every workload and destination of the node.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::{broadcast::error::RecvError, Semaphore},
};

use super::{
    explain_live::{scope_rows, ExplainQuery},
    filter::Filter,
    hub::HUB,
    records::Explainer,
};

/// The socket served, for the status file.
pub static SERVED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Readers at once; more are turned away.
const READERS: usize = 16;
/// A request is one line, sent at once.
const REQUEST_LIMIT: u64 = 64 * 1024;
const REQUEST_WITHIN: Duration = Duration::from_secs(5);
/// A line must be taken within this.
const WRITE_WITHIN: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// The last `last` records that match, then (with `follow`) those to come.
    Events {
        #[serde(default)]
        filter: Filter,
        #[serde(default)]
        last: usize,
        #[serde(default)]
        follow: bool,
    },
    /// What AUDIT scopes would have been refused, grouped.
    AuditReport,
    /// What a workload gets, decided on the agent's live policy.
    Explain(ExplainQuery),
    /// The compiled scopes, with their rules and this node's workloads.
    Scopes,
}

/// A line that is not a record: how many records a follower lost, or why a request failed.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Notice {
    Lost(u64),
    Error(String),
}

/// Binds `path` (replacing a socket left there by an agent before) and answers requests
/// until the agent stops.
pub fn serve(path: &Path, explainer: Arc<RwLock<Explainer>>) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => log::info!("replacing the control socket {}", path.display()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("removing {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} root's only", path.display()))?;
    let _ = SERVED.set(path.to_path_buf());
    let readers = Arc::new(Semaphore::new(READERS));
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    log::warn!("control socket: accepting: {err}");
                    tokio::time::sleep(super::server::ACCEPT_PAUSE).await;
                    continue;
                }
            };
            // The file's mode keeps others out; the peer's uid, should the mode be changed.
            let uid = stream.peer_cred().map(|c| c.uid());
            if !uid.is_ok_and(|uid| uid == 0 || uid == own_euid()) {
                refuse(&stream, "only root may ask the agent");
                continue;
            }
            // Refused, not queued: a queue would let followers that never leave stall
            // every later reader, `explain` included.
            let Ok(permit) = Arc::clone(&readers).try_acquire_owned() else {
                refuse(
                    &stream,
                    &format!("{READERS} readers are connected; try again"),
                );
                continue;
            };
            let explainer = Arc::clone(&explainer);
            tokio::spawn(async move {
                if let Err(err) = answer(stream, &explainer).await {
                    log::debug!("control socket: {err:#}");
                }
                drop(permit);
            });
        }
    });
    Ok(())
}

/// Says why, without waiting on the reader, and closes.
fn refuse(stream: &UnixStream, why: &str) {
    if let Ok(mut line) = serde_json::to_vec(&Notice::Error(why.to_string())) {
        line.push(b'\n');
        let _ = stream.try_write(&line);
    }
}

/// The agent's effective uid (root in a DaemonSet; another in a test that runs unprivileged).
fn own_euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

async fn answer(stream: UnixStream, explainer: &RwLock<Explainer>) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut read = tokio::io::BufReader::new(read.take(REQUEST_LIMIT));
    tokio::time::timeout(REQUEST_WITHIN, read.read_line(&mut line))
        .await
        .context("no request within 5 s")??;
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(err) => {
            let notice = Notice::Error(format!("not a request: {err}"));
            return send(&mut write, &notice).await;
        }
    };
    match request {
        Request::Events {
            filter,
            last,
            follow,
        } if follow => {
            // A follower sends nothing more: EOF (or an error) means it left, even while no
            // record comes to fail a write. (A reader that half-closes after its request
            // gets the recent records only.)
            let gone = async move {
                let mut rest = Vec::new();
                let _ = read.read_to_end(&mut rest).await;
            };
            tokio::select! {
                sent = events(&mut write, &filter, last, true) => sent,
                () = gone => Ok(()),
            }
        }
        Request::Events { filter, last, .. } => events(&mut write, &filter, last, false).await,
        Request::AuditReport => send(&mut write, &HUB.audit().report()).await,
        Request::Scopes => {
            let rows = {
                let ex = explainer.read().unwrap_or_else(|p| p.into_inner());
                scope_rows(&ex)
            };
            send(&mut write, &rows).await
        }
        Request::Explain(query) => {
            let answer = {
                let ex = explainer.read().unwrap_or_else(|p| p.into_inner());
                query.answer(&ex)
            };
            match answer {
                Ok(a) => send(&mut write, &a).await,
                Err(why) => send(&mut write, &Notice::Error(why)).await,
            }
        }
    }
}

async fn events(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    filter: &Filter,
    last: usize,
    follow: bool,
) -> anyhow::Result<()> {
    let (recent, mut feed) = HUB.recent_and_feed();
    let matching: Vec<_> = recent.iter().filter(|r| filter.matches(r)).collect();
    for record in &matching[matching.len().saturating_sub(last)..] {
        send(write, record.as_ref()).await?;
    }
    if !follow {
        return Ok(());
    }
    loop {
        match feed.recv().await {
            Ok(record) if filter.matches(&record) => send(write, record.as_ref()).await?,
            Ok(_) => {}
            Err(RecvError::Lagged(lost)) => send(write, &Notice::Lost(lost)).await?,
            Err(RecvError::Closed) => return Ok(()),
        }
    }
}

async fn send(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    value: &impl Serialize,
) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(value)?;
    line.push(b'\n');
    // A reader that stops reading gives up its place.
    tokio::time::timeout(WRITE_WITHIN, write.write_all(&line))
        .await
        .context("the reader stopped reading")??;
    Ok(())
}

/// The socket's default place: beside the status file.
pub fn default_path(status_file: &Path) -> PathBuf {
    status_file.with_file_name("agent.sock")
}

/// The client side: sends `request` and returns the lines that answer it, as they come.
pub fn ask(
    socket: &Path,
    request: &Request,
) -> anyhow::Result<impl Iterator<Item = anyhow::Result<serde_json::Value>>> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the agent's control socket {} (is the agent running, and are you root?)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    Ok(BufReader::new(stream).lines().map(|line| {
        let line = line.context("reading from the agent")?;
        let value: serde_json::Value = serde_json::from_str(&line)?;
        if let Some(why) = value.get("error").and_then(|e| e.as_str()) {
            anyhow::bail!("the agent: {why}");
        }
        Ok(value)
    }))
}

/// Asks for one answer.
pub fn ask_one<T: serde::de::DeserializeOwned>(
    socket: &Path,
    request: &Request,
) -> anyhow::Result<T> {
    let value = ask(socket, request)?
        .next()
        .context("the agent closed the socket without an answer")??;
    Ok(serde_json::from_value(value)?)
}
