//! Test harness: a real `torpor server` (the binary under test) with its own data directory,
//! port and address pool, driven over its public API. Needs root, QEMU and a built guest image;
//! without them the tests fail loudly, never skip.

#![allow(dead_code)]

pub mod channel;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

pub const TORPOR: &str = env!("CARGO_BIN_EXE_torpor");
/// Set in every test daemon's environment.
pub const ENV_SENTINEL: &str = "TORPOR_TEST_SENTINEL";

/// Images are shared by all tests: `$TORPOR_IMAGES` or the default cache.
pub fn image_dir() -> PathBuf {
    std::env::var_os("TORPOR_IMAGES").map(PathBuf::from).unwrap_or_else(|| "/var/cache/torpor/images".into())
}

fn require_environment() {
    assert!(nix::unistd::Uid::effective().is_root(), "these tests need root (network namespaces, taps, nftables)");
    assert!(
        Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success()),
        "qemu-system-x86_64 is missing: run scripts/deps.sh"
    );
    assert!(
        image_dir().join("base.current").is_file(),
        "no guest image in {}: run `torpor image build` (scripts/test.sh does)",
        image_dir().display()
    );
}

/// A slot (port and address pool) no other concurrently running test daemon holds. The lock is
/// kept for the daemon's lifetime.
fn claim_slot() -> (u16, std::fs::File) {
    for n in 0..64u16 {
        let path = format!("/tmp/torpor-test-slot-{n}.lock");
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).expect("lock file");
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return (n, file);
        }
    }
    panic!("no free test slot (64 daemons running?)");
}

/// Removes what a test daemon killed in this slot before it could clean up left behind (its
/// sandboxes' veths, namespaces and VM processes), so a run interrupted mid-test cannot fail
/// the next one with "host address … is already on interface …". Only called with the slot's
/// lock held: whatever holds addresses of this slot's pool then belongs to no live test.
fn clear_leftovers(slot: u16) {
    let pool_prefix = format!("10.{}.", 200 + slot);
    let Ok(out) = Command::new("ip").args(["-j", "-4", "addr", "show"]).output() else { return };
    let links: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    for link in links {
        let Some(name) = link["ifname"].as_str() else { continue };
        let in_pool = link["addr_info"].as_array().is_some_and(|addrs| {
            addrs.iter().any(|a| a["local"].as_str().is_some_and(|ip| ip.starts_with(&pool_prefix)))
        });
        let Some(id) = name.strip_prefix("tv").filter(|_| in_pool) else { continue };
        eprintln!("test slot {slot}: removing leftovers of {id} (interface {name})");
        torpor_testkit::remove_sandbox(id);
    }
}

pub struct Daemon {
    /// This daemon's slot: its port, address pool and lab internet derive from it.
    pub slot: u16,
    pub home: tempfile::TempDir,
    pub url: String,
    pub api_key: String,
    pub config_path: PathBuf,
    server: Option<torpor_testkit::Server>,
    _slot_lock: std::fs::File,
    http: reqwest::Client,
    /// Dropped after the daemon (and its sandboxes) are gone.
    pub internet: Option<torpor_testkit::Internet>,
}

/// Config text derived from the lab internet's addresses.
pub type LabConfig = std::sync::Arc<dyn Fn(&torpor_testkit::Internet) -> String + Send + Sync>;

/// Extra TOML lines for a test daemon's config.
#[derive(Default, Clone)]
pub struct Options {
    pub extra_config: String,
    pub image_dir: Option<PathBuf>,
    /// Start a lab internet (torpor-testkit) for this daemon, with records of this TTL, and make
    /// its DNS server the daemon's upstream (unless `host_dns`).
    pub internet_ttl: Option<u32>,
    /// Keep the host's resolver as the sandboxes' upstream even with a lab internet: for
    /// builds that fetch packages from the real registries.
    pub host_dns: bool,
    /// More config, written once the lab internet exists (its addresses are known then);
    /// appended last, so it may open TOML tables.
    pub lab_config: Option<LabConfig>,
}

impl Daemon {
    pub async fn start() -> Daemon {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> Daemon {
        require_environment();
        let (slot, lock) = claim_slot();
        clear_leftovers(slot);
        let home = tempfile::Builder::new().prefix("torpor-test-").tempdir().expect("temp home");
        let port = 17100 + slot;
        let internet =
            opts.internet_ttl.map(|ttl| torpor_testkit::Internet::start(slot as u8, ttl).expect("lab internet"));
        let upstream = match &internet {
            Some(_) if opts.host_dns => String::new(),
            Some(net) => format!("dns_upstreams = [\"{}\"]\n", net.dns_server()),
            None => String::new(),
        };
        let lab_config = match (&internet, &opts.lab_config) {
            (Some(net), Some(f)) => f(net),
            _ => String::new(),
        };
        // VM uids of concurrently running test daemons must not overlap either.
        let uid_base = 1_000_000_000 + u32::from(slot) * 20_000;
        let config = format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nimage_dir = \"{}\"\naddress_pool = \"10.{}.0.0/16\"\nvm_uid_base = {uid_base}\n{upstream}{}\n{lab_config}\n",
            home.path().display(),
            opts.image_dir.unwrap_or_else(image_dir).display(),
            200 + slot,
            opts.extra_config
        );
        let config_path = home.path().join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut daemon = Daemon {
            slot,
            internet,
            url: format!("http://127.0.0.1:{port}"),
            api_key: String::new(),
            config_path,
            home,
            server: None,
            _slot_lock: lock,
            http: reqwest::Client::new(),
        };
        daemon.spawn().await;
        daemon
    }

    /// Starts (or restarts) the server process and waits for it to answer.
    /// Starts the server (again, after `kill_server`, with the same config and data).
    pub async fn spawn(&mut self) {
        let started = match self.server.as_mut() {
            Some(server) => server.restart().await,
            None => {
                // The jail tests check that nothing of the daemon's environment reaches a VM.
                let env = [(ENV_SENTINEL, "must-not-reach-the-vm"), ("RUST_LOG", "info")];
                torpor_testkit::Server::start(Path::new(TORPOR), &self.config_path, self.home.path(), &self.url, &env)
                    .await
                    .map(|server| self.server = Some(server))
            }
        };
        if let Err(e) = started {
            panic!("{e}");
        }
        self.api_key = self.server.as_ref().expect("started").api_key.clone();
    }

    pub fn server_pid(&self) -> u32 {
        self.server.as_ref().and_then(torpor_testkit::Server::pid).expect("the server runs")
    }

    /// Kills the server process the hard way (sandboxes keep running).
    pub fn kill_server(&mut self) {
        if let Some(server) = self.server.as_mut() {
            server.kill();
        }
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.home.path().join("server.log")).unwrap_or_default()
    }

    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.url)).bearer_auth(&self.api_key)
    }

    /// Sends and returns (status, JSON body or Null).
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self.request(method, path);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn create(&self, body: Value) -> Value {
        let (status, sandbox) = self.call(Method::POST, "/v1/sandboxes", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "create failed: {sandbox}\n{}", self.server_log());
        assert_eq!(sandbox["state"], "running");
        sandbox
    }

    pub async fn get(&self, id: &str) -> Value {
        let (status, sandbox) = self.call(Method::GET, &format!("/v1/sandboxes/{id}"), None).await;
        assert_eq!(status, StatusCode::OK, "{sandbox}");
        sandbox
    }

    /// Polls the sandbox until it reaches `state`; returns it then.
    pub async fn wait_for_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let sandbox = self.get(id).await;
            if sandbox["state"] == state {
                return sandbox;
            }
            assert!(Instant::now() < deadline, "{id} did not become {state}: {sandbox}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn list_ids(&self) -> Vec<String> {
        let (_, list) = self.call(Method::GET, "/v1/sandboxes", None).await;
        list["sandboxes"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_owned()).collect()
    }

    /// Runs argv to completion: (exit code, stdout, stderr).
    pub async fn exec(&self, id: &str, argv: &[&str]) -> (Option<i64>, Vec<u8>, Vec<u8>) {
        self.exec_req(id, json!({ "argv": argv })).await
    }

    pub async fn exec_req(&self, id: &str, req: Value) -> (Option<i64>, Vec<u8>, Vec<u8>) {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let resp = self.request(Method::POST, &format!("/v1/sandboxes/{id}/exec")).json(&req).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "exec refused: {}", resp.text().await.unwrap_or_default());
        let body = resp.bytes().await.unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let ev: Value = serde_json::from_slice(line).unwrap();
            match ev["type"].as_str().unwrap() {
                "stdout" => out.extend(b64.decode(ev["data"].as_str().unwrap()).unwrap()),
                "stderr" => err.extend(b64.decode(ev["data"].as_str().unwrap()).unwrap()),
                "exit" => return (ev["code"].as_i64(), out, err),
                "error" => panic!("exec error: {ev}"),
                _ => {}
            }
        }
        panic!("exec stream ended without exit");
    }

    /// Runs the `torpor` CLI against this daemon.
    pub fn cli(&self, args: &[&str], stdin: &[u8]) -> std::process::Output {
        use std::io::Write;
        let mut child = Command::new(TORPOR)
            .args(args)
            .env("TORPOR_URL", &self.url)
            .env("TORPOR_API_KEY", &self.api_key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Feed stdin from a thread: the CLI's output must be read while input is still flowing.
        let mut pipe = child.stdin.take().unwrap();
        let input = stdin.to_vec();
        let writer = std::thread::spawn(move || pipe.write_all(&input));
        let output = child.wait_with_output().unwrap();
        match writer.join().unwrap() {
            // A command that ends without reading all its input ends the CLI too: the rest of
            // the input has nowhere to go.
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => panic!("writing the CLI's stdin: {e}"),
            _ => {}
        }
        output
    }

    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.home.path().join("sandboxes").join(id)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill_server();
        // Whatever a failed test left running: its VMs, veths and namespaces.
        torpor_testkit::remove_sandboxes_of(self.home.path());
    }
}

/// Live (non-zombie) processes whose command line names this sandbox's VM.
pub fn vm_pids(id: &str) -> Vec<u32> {
    let name = format!("torpor-{id}");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.split(|b| *b == 0).any(|arg| arg == name.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

/// Asserts that nothing of sandbox `id` runs or exists on the host any more, except, when
/// `keep_dir`, its directory (a stopped sandbox keeps its disk).
pub fn assert_nothing_left(daemon: &Daemon, id: &str, keep_dir: bool) {
    assert!(vm_pids(id).is_empty(), "VM process of {id} still running: {:?}", vm_pids(id));
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(!netns.contains(id), "namespace of {id} left behind:\n{netns}");
    let suffix = &id[..id.len().min(13)];
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains(&format!("tv{suffix}")), "veth of {id} left behind:\n{links}");
    let rules = Command::new("nft").args(["list", "ruleset"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&rules.stdout).contains(id), "nftables rules mention {id}");
    let dir = daemon.sandbox_dir(id);
    if keep_dir {
        assert!(dir.join("disk.qcow2").is_file(), "stopped sandbox lost its disk");
        assert!(!dir.join("qmp.sock").exists(), "control socket left behind");
    } else {
        assert!(!dir.exists(), "files of {id} left behind in {}", dir.display());
    }
}

/// Polls `check` until it holds; a condition, not a sleep.
/// Runs `script` with `sh -c` in sandbox `id`, which must exit 0; its trimmed stdout.
pub async fn sh(d: &Daemon, id: &str, script: &str) -> String {
    let (code, out, err) = d.exec(id, &["sh", "-c", script]).await;
    assert_eq!(code, Some(0), "{script}: {}{}", String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
    String::from_utf8_lossy(&out).trim().to_owned()
}

pub async fn wait_for<F: FnMut() -> bool>(what: &str, timeout: Duration, mut check: F) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes `value` (and a newline) to a root-only file, as the daemon wants its secrets.
pub fn private_file(dir: &Path, name: &str, value: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("{value}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}
