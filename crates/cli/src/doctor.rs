//! `torpor doctor`: the host as the daemon will use it, one line per check, and for each
//! problem the command that fixes it. Exits non-zero when something the daemon needs is
//! missing; warnings (slower, smaller) do not fail it.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::Result;
use torpor_control::config::Config;
use torpor_engine::cgroup::Hierarchy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Warn,
    Fail,
}

struct Check {
    status: Status,
    what: String,
    detail: String,
    fix: Option<String>,
}

fn check(status: Status, what: &str, detail: impl Into<String>, fix: Option<String>) -> Check {
    Check { status, what: what.to_owned(), detail: detail.into(), fix }
}

/// Programs the daemon runs (`true`) or `torpor image build` runs, each with its package and
/// how it tells its version.
const PROGRAMS: &[(&str, &str, &[&str], bool)] = &[
    ("qemu-img", "qemu-utils", &["--version"], true),
    ("ip", "iproute2", &["-V"], true),
    ("nft", "nftables", &["--version"], true),
    ("conntrack", "conntrack", &["--version"], true),
    ("sysctl", "procps", &["--version"], true),
    ("fallocate", "util-linux", &["--version"], true),
    ("mmdebstrap", "mmdebstrap", &["--version"], false),
    ("busybox", "busybox-static", &[], false),
    ("cpio", "cpio", &["--version"], false),
    ("mke2fs", "e2fsprogs", &["-V"], false),
    ("modinfo", "kmod", &["--version"], false),
    ("dpkg-deb", "dpkg", &["--version"], false),
];

/// The first line a program prints about itself, or `None` if it cannot be run.
fn version(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
    let text = String::from_utf8_lossy(&text);
    Some(text.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_owned())
}

fn programs(cfg: &Config) -> Vec<Check> {
    let mut checks = Vec::new();
    let qemu = version(&cfg.engine.qemu, &["--version"]);
    checks.push(match qemu {
        Some(v) => check(Status::Ok, &cfg.engine.qemu, v, None),
        None => check(Status::Fail, &cfg.engine.qemu, "not found", Some("apt-get install qemu-system-x86".into())),
    });
    for (program, package, args, runtime) in PROGRAMS {
        checks.push(match version(program, args) {
            Some(v) => check(Status::Ok, program, v, None),
            None => {
                let (status, why) = if *runtime {
                    (Status::Fail, "not found")
                } else {
                    (Status::Warn, "not found (`torpor image build` needs it)")
                };
                check(status, program, why, Some(format!("apt-get install {package}")))
            }
        });
    }
    checks
}

fn accelerator(cfg: &Config) -> Check {
    let host = torpor_engine::HostVirt::probe();
    match torpor_engine::choose_accel(cfg.engine.accel, host) {
        Ok(choice) => match choice.warning {
            None => check(Status::Ok, "accelerator", choice.accel.to_string(), None),
            Some(warning) => check(
                Status::Warn,
                "accelerator",
                format!("{}: {warning}", choice.accel),
                Some(
                    "on a host with VT-x/AMD-V (bare metal, or a cloud VM with nested virtualisation) KVM is used"
                        .into(),
                ),
            ),
        },
        Err(e) => check(Status::Fail, "accelerator", e.to_string(), Some("set accel = \"auto\" or \"tcg\"".into())),
    }
}

fn cgroups() -> Check {
    let root = Path::new(torpor_engine::cgroup::ROOT);
    match Hierarchy::detect() {
        Some(Hierarchy::V2) => check(Status::Ok, "cgroups", "v2 with cpu, memory and pids", None),
        Some(Hierarchy::V1) => {
            let memsw = root.join("memory/memory.memsw.limit_in_bytes").exists();
            let detail = if memsw { "v1 (cpu, memory with swap accounting, pids)" } else { "v1 (cpu, memory, pids)" };
            check(Status::Ok, "cgroups", detail, None)
        }
        None => check(
            Status::Fail,
            "cgroups",
            format!(
                "no hierarchy with the cpu, memory and pids controllers under {}: no VM would start",
                root.display()
            ),
            Some(
                "boot with cgroup v2 and its controllers delegated (systemd's default), or mount the v1 controllers"
                    .into(),
            ),
        ),
    }
}

fn nftables() -> Check {
    match Command::new("nft").args(["list", "tables"]).output() {
        Ok(out) if out.status.success() => check(Status::Ok, "nftables", "the kernel accepts rules", None),
        Ok(out) => check(
            Status::Fail,
            "nftables",
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            Some("run as root, on a kernel with nf_tables (modprobe nf_tables)".into()),
        ),
        Err(e) => check(Status::Fail, "nftables", e.to_string(), Some("apt-get install nftables".into())),
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

fn kernel_settings() -> Vec<Check> {
    let forward = read_trimmed("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
    let forwarding = if forward == "1" {
        check(Status::Ok, "ip forwarding", "on", None)
    } else {
        check(Status::Ok, "ip forwarding", "off now; the daemon turns it on when it starts", None)
    };
    let conntrack = match read_trimmed("/proc/sys/net/netfilter/nf_conntrack_max").and_then(|v| v.parse::<u64>().ok()) {
        Some(max) if max < 65536 => check(
            Status::Warn,
            "conntrack table",
            format!("{max} entries, shared by every sandbox (each may hold 1024 open connections)"),
            Some("sysctl -w net.netfilter.nf_conntrack_max=262144".into()),
        ),
        Some(max) => check(Status::Ok, "conntrack table", format!("{max} entries"), None),
        None => check(Status::Ok, "conntrack table", "not loaded yet (the first sandbox loads it)", None),
    };
    let files = match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        Ok((_, hard)) if hard < 65536 => check(
            Status::Warn,
            "open files",
            format!("hard limit {hard}: each sandbox holds a few dozen descriptors in the daemon"),
            Some("raise LimitNOFILE (systemd) or the hard nofile limit (limits.conf)".into()),
        ),
        Ok((_, hard)) => {
            check(Status::Ok, "open files", format!("hard limit {hard} (the daemon raises its own to it)"), None)
        }
        Err(e) => check(Status::Warn, "open files", e.to_string(), None),
    };
    vec![forwarding, conntrack, files]
}

fn disk(cfg: &Config) -> Check {
    // The data directory, or the nearest parent that exists (before the first start).
    let mut dir: PathBuf = cfg.data_dir.clone();
    while !dir.exists() {
        if !dir.pop() {
            break;
        }
    }
    match nix::sys::statvfs::statvfs(&dir) {
        Ok(fs) => {
            let free = fs.blocks_available() * fs.fragment_size();
            let gib = free as f64 / (1u64 << 30) as f64;
            let detail = format!("{gib:.1} GiB free for {}", cfg.data_dir.display());
            if gib < 1.0 {
                check(Status::Fail, "disk", detail, Some("free space, or set data_dir to a larger filesystem".into()))
            } else if gib < 10.0 {
                check(
                    Status::Warn,
                    "disk",
                    detail,
                    Some("each paused sandbox keeps its touched RAM and disk layer".into()),
                )
            } else {
                check(Status::Ok, "disk", detail, None)
            }
        }
        Err(e) => check(Status::Fail, "disk", format!("{}: {e}", dir.display()), None),
    }
}

fn image(cfg: &Config) -> Check {
    match torpor_image::ImageStore::new(&cfg.image_dir).current("base") {
        Ok(image) => check(Status::Ok, "guest image", image.dir.display().to_string(), None),
        Err(e) => check(Status::Fail, "guest image", e.to_string(), Some("torpor image build".into())),
    }
}

async fn api(url: &str, wait: Duration) -> Check {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("a plain client builds");
    let deadline = Instant::now() + wait;
    loop {
        let answer = http.get(format!("{url}/v1/health")).send().await;
        match answer {
            Ok(resp) if resp.status().is_success() => {
                let health: serde_json::Value = resp.json().await.unwrap_or_default();
                let detail = format!(
                    "{url}: version {}, accelerator {}",
                    health["version"].as_str().unwrap_or("?"),
                    health["accelerator"].as_str().unwrap_or("none (QEMU missing)")
                );
                let status = if health["accelerator"].is_null() { Status::Fail } else { Status::Ok };
                return check(status, "API", detail, None);
            }
            other if Instant::now() >= deadline => {
                let why = match other {
                    Ok(resp) => format!("answered {}", resp.status()),
                    Err(e) => format!("no answer ({e})"),
                };
                return check(
                    Status::Fail,
                    "API",
                    format!("{url}: {why}"),
                    Some("start it: torpor server (or set TORPOR_URL / --url)".into()),
                );
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

pub async fn run(url: &str, config: Option<PathBuf>, wait: Duration) -> Result<ExitCode> {
    let cfg = Config::load(config.as_deref())?;
    let mut checks = Vec::new();
    checks.push(if nix::unistd::Uid::effective().is_root() {
        check(Status::Ok, "user", "root", None)
    } else {
        check(
            Status::Fail,
            "user",
            "not root: the daemon needs root (namespaces, taps, nftables, cgroups)",
            Some("sudo torpor doctor".into()),
        )
    });
    checks.extend(programs(&cfg));
    checks.push(accelerator(&cfg));
    checks.push(cgroups());
    checks.push(nftables());
    checks.extend(kernel_settings());
    checks.push(disk(&cfg));
    checks.push(image(&cfg));
    checks.push(api(url, wait).await);

    let width = checks.iter().map(|c| c.what.len()).max().unwrap_or(0);
    for c in &checks {
        let tag = match c.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        println!("{tag}  {:<width$}  {}", c.what, c.detail);
        if let (Some(fix), true) = (&c.fix, c.status != Status::Ok) {
            println!("      {:<width$}  → {fix}", "");
        }
    }
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    let warned = checks.iter().filter(|c| c.status == Status::Warn).count();
    println!();
    if failed == 0 {
        println!("this host can run sandboxes ({warned} warning(s))");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{failed} problem(s) to fix before sandboxes can run; each says what to run");
        Ok(ExitCode::FAILURE)
    }
}
