//! A private `torpor server`: the binary under test with a data directory, port and address pool
//! of its own, as the end-to-end tests and the benchmarks both run it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a daemon may take to answer its first health check.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Server {
    child: Option<Child>,
    binary: PathBuf,
    config: PathBuf,
    home: PathBuf,
    env: Vec<(String, String)>,
    pub url: String,
    pub api_key: String,
}

impl Server {
    /// Starts `binary server --config CONFIG` (whose `data_dir` is `home` and whose API listens
    /// on `url`) with `env` added, logging to `home/server.log`, and waits until it answers.
    pub async fn start(
        binary: &Path,
        config: &Path,
        home: &Path,
        url: &str,
        env: &[(&str, &str)],
    ) -> Result<Self, String> {
        let mut server = Self {
            child: None,
            binary: binary.to_owned(),
            config: config.to_owned(),
            home: home.to_owned(),
            env: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            url: url.to_owned(),
            api_key: String::new(),
        };
        server.restart().await?;
        Ok(server)
    }

    /// Starts it again (after [`Server::kill`]) with the same configuration and data.
    pub async fn restart(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.home.join("server.log"))
            .map_err(|e| format!("opening the server log: {e}"))?;
        let stderr = log.try_clone().map_err(|e| format!("opening the server log: {e}"))?;
        let child = Command::new(&self.binary)
            .args(["server", "--config"])
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.binary.display()))?;
        self.child = Some(child);
        let http = reqwest::Client::new();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(resp) = http.get(format!("{}/v1/health", self.url)).send().await {
                if resp.status().is_success() {
                    break;
                }
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(format!("torpor server exited ({status}):\n{}", self.log()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "torpor server did not answer within {} s:\n{}",
                    START_TIMEOUT.as_secs(),
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.api_key = std::fs::read_to_string(self.home.join("api-key"))
            .map_err(|e| format!("reading the daemon's API key: {e}"))?
            .trim()
            .to_owned();
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server process the hard way; its sandboxes keep running, as they would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("server.log")).unwrap_or_default()
    }

    pub fn home(&self) -> &Path {
        &self.home
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills what the sandboxes of the daemon whose data directory is `home` left on the host (VM
/// processes, veths, namespaces): sandboxes outlive their daemon by design, and a test's or a
/// benchmark's must not outlive it.
pub fn remove_sandboxes_of(home: &Path) {
    let Ok(entries) = std::fs::read_dir(home.join("sandboxes")) else { return };
    for entry in entries.flatten() {
        remove_sandbox(&entry.file_name().to_string_lossy());
    }
}

/// Kills sandbox `id`'s VM processes (those in its cgroup) and removes its veth and namespace.
pub fn remove_sandbox(id: &str) {
    let name = format!("torpor-{id}");
    let procs = std::fs::read_to_string(format!("/sys/fs/cgroup/memory/torpor/{name}/cgroup.procs"))
        .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/torpor/{name}/cgroup.procs")))
        .unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    let _ = Command::new("ip").args(["link", "del", &format!("tv{id}")]).status();
    let _ = Command::new("ip").args(["netns", "del", &name]).status();
}
