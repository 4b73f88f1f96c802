//! What Torpor's tests and benchmarks share: [`Server`], a private `torpor server`; a small
//! internet on this machine for sandbox egress; and fakes of the outside services.
//!
//! `Internet::start(n)` makes a network namespace holding every address of `198.18.n.0/24`
//! (RFC 2544 benchmarking space: public as far as a sandbox's policy is concerned, yet routed
//! only to this namespace, so nothing ever leaves the machine), reached from the host through a
//! veth pair on `172.31.n.0/30`. In it run:
//! - an authoritative DNS server (dnsmasq) for the `test` zone on `.53`, whose records can be
//!   replaced at run time;
//! - a rogue resolver on `.54` that answers every name with the `evil` address;
//! - one web server answering on port 80 of every address: `GET /` says which address it was
//!   reached on, `GET /bytes/N` sends N bytes;
//! - an echo server on port 7 of every address, for long-lived connections.
//!
//! Beside it, fakes of the outside services sandboxes are given credentials for, speaking their
//! real wire formats and checking what the real ones check: [`FakeGitHub`] (GitHub App
//! installation tokens), [`FakeModels`] (the Anthropic Messages and OpenAI chat APIs),
//! [`FakeTelegram`] and [`FakeSlack`] (the chat platforms' reply APIs).

mod chat;
mod github;
mod models;
mod server;

pub use chat::{slack_signature, FakeSlack, FakeTelegram, SlackPost, TelegramMessage};
pub use github::{FakeGitHub, GitHubApp};
pub use models::{FakeModels, ModelRequest, ToolScript};
pub use server::{remove_sandbox, remove_sandboxes_of, Server};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct Internet {
    n: u8,
    ns: String,
    veth: String,
    dir: tempfile::TempDir,
    dns: Child,
    rogue: Child,
    listeners: Vec<TcpListener>,
    ttl: u32,
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Internet {
    /// `n` picks the address block and names; two internets with different `n` coexist.
    /// `ttl`: seconds every record of the zone lives in caches.
    pub fn start(n: u8, ttl: u32) -> Result<Self> {
        let ns = format!("tpi-{n}");
        let veth = format!("tpi{n}");
        // Leftovers of a run that was killed.
        let _ = run("ip", &["link", "del", &veth]);
        let _ = run("ip", &["netns", "del", &ns]);
        let dir = tempfile::Builder::new().prefix("torpor-lab-").tempdir()?;
        let mut internet = Self {
            n,
            ns: ns.clone(),
            veth: veth.clone(),
            dns: Command::new("true").spawn()?,
            rogue: Command::new("true").spawn()?,
            dir,
            listeners: Vec::new(),
            ttl,
        };
        let block = format!("198.18.{n}.0/24");
        let (host_end, ns_end) = (format!("172.31.{n}.1"), format!("172.31.{n}.2"));
        run("ip", &["netns", "add", &ns])?;
        run("ip", &["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        run("ip", &["addr", "add", &format!("{host_end}/30"), "dev", &veth])?;
        run("ip", &["link", "set", &veth, "up"])?;
        run("ip", &["route", "replace", &block, "via", &ns_end])?;
        let inside = |args: &[&str]| {
            let mut full = vec!["-n", ns.as_str()];
            full.extend_from_slice(args);
            run("ip", &full)
        };
        inside(&["link", "set", "lo", "up"])?;
        inside(&["addr", "add", &format!("{ns_end}/30"), "dev", "eth0"])?;
        inside(&["link", "set", "eth0", "up"])?;
        inside(&["route", "add", "default", "via", &host_end])?;
        // Every address of the block is local here ("AnyIP"), so one server answers on all.
        inside(&["route", "add", "local", &block, "dev", "lo"])?;
        for host in [53, 54] {
            inside(&["addr", "add", &format!("198.18.{n}.{host}/32"), "dev", "lo"])?;
        }
        internet.listeners = internet.in_ns(|| {
            let web = TcpListener::bind("0.0.0.0:80")?;
            let echo = TcpListener::bind("0.0.0.0:7")?;
            Ok(vec![web, echo])
        })?;
        let web = internet.listeners[0].try_clone()?;
        std::thread::spawn(move || serve(web, http));
        let echo = internet.listeners[1].try_clone()?;
        std::thread::spawn(move || serve(echo, echo_lines));
        internet.set_records(&[])?;
        internet.dns = internet.dnsmasq(&[
            &format!("--listen-address={}", internet.dns_server()),
            &format!("--addn-hosts={}", internet.hosts_file().display()),
            "--local=/test/",
        ])?;
        internet.rogue = internet.dnsmasq(&[
            &format!("--listen-address={}", internet.rogue_dns()),
            &format!("--address=/#/{}", internet.addr(12)),
        ])?;
        internet.wait_for_dns()?;
        Ok(internet)
    }

    /// `198.18.n.host`.
    pub fn addr(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.n, host)
    }

    /// The authoritative server for `test`: a sandbox daemon's upstream.
    pub fn dns_server(&self) -> Ipv4Addr {
        self.addr(53)
    }

    /// Answers every name, with `addr(12)`.
    pub fn rogue_dns(&self) -> Ipv4Addr {
        self.addr(54)
    }

    fn hosts_file(&self) -> PathBuf {
        self.dir.path().join("hosts")
    }

    /// Replaces the zone's A records and makes the server reload them.
    pub fn set_records(&self, records: &[(&str, Ipv4Addr)]) -> Result<()> {
        let text: String = records.iter().map(|(name, ip)| format!("{ip} {name}\n")).collect();
        let tmp = self.dir.path().join("hosts.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.hosts_file())?;
        // SIGHUP: dnsmasq re-reads its hosts files and empties its cache.
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.dns.id() as i32), nix::sys::signal::Signal::SIGHUP);
        Ok(())
    }

    fn dnsmasq(&self, args: &[&str]) -> Result<Child> {
        let mut full = vec![
            "netns".to_owned(),
            "exec".to_owned(),
            self.ns.clone(),
            "dnsmasq".to_owned(),
            "--keep-in-foreground".to_owned(),
            "--conf-file=/dev/null".to_owned(),
            "--no-resolv".to_owned(),
            "--no-hosts".to_owned(),
            "--bind-interfaces".to_owned(),
            "--user=root".to_owned(),
            "--pid-file=".to_owned(),
            format!("--local-ttl={}", self.ttl),
            "--log-facility=/dev/null".to_owned(),
        ];
        full.extend(args.iter().map(|s| s.to_string()));
        Command::new("ip")
            .args(&full)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting dnsmasq (apt-get install dnsmasq-base)")
    }

    fn wait_for_dns(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        for server in [self.dns_server(), self.rogue_dns()] {
            loop {
                let out = Command::new("dig")
                    .args([&format!("@{server}"), "probe.test", "+time=1", "+tries=1"])
                    .output()
                    .context("running dig (apt-get install bind9-dnsutils)")?;
                if String::from_utf8_lossy(&out.stdout).contains("status:") {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the lab's DNS server {server} did not answer within 10 s");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// A listening socket on `port` of every address of the block, for a server of the
    /// caller's (one of the fakes).
    pub fn listen(&self, port: u16) -> Result<TcpListener> {
        let listener = self.in_ns(move || TcpListener::bind(("0.0.0.0", port)))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    }

    /// Runs `f` on a thread inside the lab's namespace (sockets it makes live there).
    fn in_ns<T: Send + 'static>(&self, f: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> Result<T> {
        let handle = std::fs::File::open(format!("/run/netns/{}", self.ns))?;
        let result = std::thread::spawn(move || {
            nix::sched::setns(&handle, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("namespace thread panicked"))??;
        Ok(result)
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        let _ = self.dns.kill();
        let _ = self.rogue.kill();
        let _ = self.dns.wait();
        let _ = self.rogue.wait();
        for l in &self.listeners {
            // SAFETY: shutting down a socket we own; wakes the thread blocked in accept.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        let _ = run("ip", &["route", "del", &format!("198.18.{}.0/24", self.n)]);
        let _ = run("ip", &["link", "del", &self.veth]);
        let _ = run("ip", &["netns", "del", &self.ns]);
    }
}

fn serve(listener: TcpListener, handler: fn(TcpStream) -> std::io::Result<()>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                std::thread::spawn(move || handler(stream));
            }
            Err(_) => return,
        }
    }
}

fn http(mut stream: TcpStream) -> std::io::Result<()> {
    let local = stream.local_addr()?.ip();
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    if let Some(n) = path.strip_prefix("/bytes/").and_then(|n| n.parse::<u64>().ok()) {
        write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n")?;
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len() as u64) as usize;
            stream.write_all(&chunk[..k])?;
            left -= k as u64;
        }
        return Ok(());
    }
    let body = format!("hello from {local}\n");
    write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
}

fn echo_lines(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}
