//! `torpor template build|list|rm`: a template file describes a machine — files, build commands,
//! processes to keep running — and the build snapshots it running, so every sandbox created from
//! it starts with those processes already up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde::Deserialize;
use torpor_control::model::{
    CreateSandbox, CreateTemplate, ExecEvent, ExecRequest, NetworkMode, NetworkPolicy, Sandbox, Template,
};

use crate::client::Client;

#[derive(Subcommand)]
pub enum TemplateCommand {
    /// Build template NAME from a template file (format: docs/templates.md), or build one of the
    /// templates shipped with Torpor (`coder`) when no file is given.
    Build {
        /// Template name: 1-40 of a-z, 0-9 and -.
        name: String,
        /// The template file (TOML); `source` paths in it are relative to it. Default: the shipped
        /// template called NAME.
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// A CA certificate (PEM) the build VM and the template's sandboxes trust, for a
        /// TLS-intercepting proxy between the host and the package registries (repeatable).
        #[arg(long = "ca-cert", value_name = "PEM")]
        ca_certs: Vec<PathBuf>,
    },
    /// List templates.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a template no sandbox uses.
    Rm { name: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateFile {
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    #[serde(default)]
    pub packages: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, rename = "file")]
    pub files: Vec<FileSpec>,
    #[serde(default, rename = "run")]
    pub runs: Vec<RunSpec>,
    #[serde(default, rename = "process")]
    pub processes: Vec<ProcessSpec>,
    /// Files and directories (absolute) to read once right before the snapshot, so that they are
    /// in the page cache of every sandbox: what the first request needs (an agent's binary, say)
    /// is then not read from disk.
    #[serde(default)]
    pub preload: Vec<String>,
    /// Egress policy of sandboxes created from the template (deny-all if omitted).
    pub network: Option<NetworkPolicy>,
    /// Egress policy of the build VM (what `packages` and `[[run]]` may reach); `network` if
    /// omitted.
    pub build_network: Option<NetworkPolicy>,
    /// Static secrets (names from the daemon's config) its sandboxes receive.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// The GitHub token scope its sandboxes receive (`repositories`, `permissions`).
    pub github: Option<torpor_control::model::GitHubGrant>,
    /// Model proxy access of its sandboxes (`providers`, `token_budget`).
    pub models: Option<torpor_control::model::ModelGrant>,
    /// The agent its sandboxes run for relayed messages (`adapter`, `command`, `cwd`, `env`).
    pub agent: Option<torpor_control::model::AgentConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    pub path: String,
    /// Inline contents.
    pub content: Option<String>,
    /// A host file, relative to the template file.
    pub source: Option<PathBuf>,
    pub mode: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    pub command: String,
    pub timeout_secs: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    pub name: String,
    pub command: String,
    /// A shell command that exits 0 once the process is ready.
    pub ready: String,
    pub ready_timeout_secs: Option<u64>,
    pub cwd: Option<String>,
}

impl TemplateFile {
    pub fn parse(text: &str) -> Result<Self> {
        let t: TemplateFile = toml::from_str(text).context("invalid template file")?;
        if !t.packages.is_empty() && t.build_policy().mode == NetworkMode::DenyAll {
            bail!(
                "packages = {:?}: installing packages needs the build VM to reach a Debian mirror; give it a \
                 policy, e.g. [build_network] mode = \"allowlist\", allow_domains = [\"deb.debian.org\"]",
                t.packages
            );
        }
        for p in &t.packages {
            if p.is_empty() || !p.chars().all(|c| c.is_ascii_alphanumeric() || "+-.:=~".contains(c)) {
                bail!("package {p:?} is not a Debian package name");
            }
        }
        for f in &t.files {
            if f.content.is_some() == f.source.is_some() {
                bail!("file {}: give exactly one of `content` and `source`", f.path);
            }
            if let Some(source) = &f.source {
                let outside =
                    source.is_absolute() || source.components().any(|c| matches!(c, std::path::Component::ParentDir));
                if outside {
                    bail!(
                        "file {}: source {} must be a path inside the template file's directory (no leading /, no ..)",
                        f.path,
                        source.display()
                    );
                }
            }
        }
        for path in &t.preload {
            if !path.starts_with('/') || path.contains(['\'', '\n']) {
                bail!("preload {path:?}: give an absolute path (without quotes or newlines)");
            }
        }
        for p in &t.processes {
            if p.name.is_empty() || !p.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                bail!("process name {:?} must be letters, digits, - and _", p.name);
            }
        }
        Ok(t)
    }

    pub fn build_policy(&self) -> NetworkPolicy {
        self.build_network.clone().or_else(|| self.network.clone()).unwrap_or_default()
    }

    /// `[[run]]` steps, preceded by the package installation if there is one.
    pub fn run_steps(&self) -> Vec<RunSpec> {
        let mut steps = Vec::new();
        if !self.packages.is_empty() {
            steps.push(RunSpec {
                command: format!(
                    "apt-get -o Acquire::Retries=3 update -q && DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=3 install -y -q --no-install-recommends {}",
                    self.packages.join(" ")
                ),
                timeout_secs: Some(1800.0),
            });
        }
        steps.extend(self.runs.iter().cloned());
        steps
    }
}

pub async fn run(cmd: TemplateCommand, url: &str, api_key: Option<String>) -> Result<()> {
    let client = Client::new(url, api_key)?;
    match cmd {
        TemplateCommand::Build { name, file, ca_certs } => {
            let origin = match file {
                Some(file) => Origin::from_file(&file)?,
                None => Origin::shipped(&name)?,
            };
            build(&client, &name, &origin, &ca_certs).await
        }
        TemplateCommand::List { json } => {
            let list: serde_json::Value = client.json(Method::GET, "/v1/templates", None::<&()>).await?;
            let templates: Vec<Template> = serde_json::from_value(list["templates"].clone())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&templates)?);
            } else {
                println!(
                    "{:<16} {:>5} {:>7} {:>9}  {:<16} {:<28} NETWORK",
                    "NAME", "VCPUS", "MEMORY", "SIZE", "BUILT", "RUNNING"
                );
                for t in templates {
                    println!(
                        "{:<16} {:>5} {:>6}M {:>9}  {:<16} {:<28} {}",
                        t.name,
                        t.vcpus,
                        t.memory_mib,
                        human_bytes(t.size_bytes),
                        t.created_at.format("%Y-%m-%d %H:%M"),
                        running(&t),
                        describe_policy(&t.network)
                    );
                }
            }
            Ok(())
        }
        TemplateCommand::Rm { name } => {
            client.send(client.request(Method::DELETE, &format!("/v1/templates/{name}"))).await?;
            println!("template {name} removed");
            Ok(())
        }
    }
}

/// Runs `argv` to completion; returns (exit code, combined output).
pub(crate) async fn exec(client: &Client, id: &str, req: ExecRequest) -> Result<(Option<i32>, String)> {
    let (out, err, exit) = client.exec_collect(id, &req).await?;
    let code = match exit {
        ExecEvent::Exit { code, .. } => code,
        _ => None,
    };
    Ok((code, format!("{}{}", String::from_utf8_lossy(&out), String::from_utf8_lossy(&err))))
}

/// Runs `script` (`sh -c`), which must exit 0; else fails saying `what` failed and its output.
async fn exec_ok(client: &Client, id: &str, script: &str, what: &str) -> Result<()> {
    let (code, output) = exec(client, id, shell(script)).await?;
    if code != Some(0) {
        bail!("{what} failed (exit {code:?}): {}", output.trim_end());
    }
    Ok(())
}

pub(crate) fn shell(command: &str) -> ExecRequest {
    ExecRequest { argv: vec!["sh".into(), "-c".into(), command.into()], ..Default::default() }
}

/// The templates that ship inside this binary, each a directory with `template.toml`.
static SHIPPED: include_dir::Dir = include_dir::include_dir!("$CARGO_MANIFEST_DIR/../../templates");

/// Where a template file and the files it names come from.
pub enum Origin {
    File { path: PathBuf, text: String },
    Shipped { name: String, dir: &'static include_dir::Dir<'static>, text: String },
}

impl Origin {
    fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Origin::File { path: path.to_owned(), text })
    }

    pub fn shipped(name: &str) -> Result<Self> {
        let dir = SHIPPED.get_dir(name).filter(|d| d.get_file(d.path().join("template.toml")).is_some());
        let Some(dir) = dir else {
            let names: Vec<String> = SHIPPED.dirs().map(|d| d.path().display().to_string()).collect::<Vec<_>>();
            bail!(
                "no template file given (-f FILE) and no template called {name:?} ships with torpor; shipped: {}",
                names.join(", ")
            );
        };
        let file = dir.get_file(dir.path().join("template.toml")).expect("checked above");
        let text = file.contents_utf8().context("shipped template.toml is not UTF-8")?.to_owned();
        Ok(Origin::Shipped { name: name.to_owned(), dir, text })
    }

    pub fn text(&self) -> &str {
        match self {
            Origin::File { text, .. } | Origin::Shipped { text, .. } => text,
        }
    }

    fn describe(&self) -> String {
        match self {
            Origin::File { path, .. } => path.display().to_string(),
            Origin::Shipped { name, .. } => format!("the shipped template {name}"),
        }
    }

    /// A `source` file, relative to the template file.
    fn read(&self, source: &Path) -> Result<Vec<u8>> {
        match self {
            Origin::File { path, .. } => {
                // Resolved first: a symlink in a shared template directory must not lead out of it
                // (`template build` runs as root).
                let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
                let dir = dir.canonicalize().with_context(|| format!("resolving {}", dir.display()))?;
                let full = dir.join(source);
                // Opened first, then asked where it really is: no symlink swapped in between
                // can lead the read elsewhere.
                let mut file = std::fs::File::open(&full).with_context(|| format!("reading {}", full.display()))?;
                let real = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file)))
                    .with_context(|| format!("resolving {}", full.display()))?;
                if !real.starts_with(&dir) {
                    bail!("{} leads to {}, outside the template's directory", full.display(), real.display());
                }
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut file, &mut data)
                    .with_context(|| format!("reading {}", full.display()))?;
                Ok(data)
            }
            Origin::Shipped { name, dir, .. } => dir
                .get_file(dir.path().join(source))
                .map(|f| f.contents().to_vec())
                .with_context(|| format!("the shipped template {name} has no file {}", source.display())),
        }
    }
}

const CA_DIR: &str = "/usr/local/share/ca-certificates";
const CLEAN_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Run in the build VM after the build steps, before the processes start: drops the page cache
/// and fills free memory with zeros once (the kernel zeroes each page a process touches first),
/// so the daemon can leave those pages out of the template's memory image. The filler is the
/// OOM killer's first choice and leaves 64 MiB free; if it dies anyway, the build goes on.
const COMPACT: &str = r#"sync && echo 3 > /proc/sys/vm/drop_caches || exit 1
command -v python3 >/dev/null || exit 0
python3 - <<'EOF'
import mmap
open("/proc/self/oom_score_adj", "w").write("1000")
free = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemFree:")) * 1024
chunk = 1 << 20
size = (max(0, free - (64 << 20)) // chunk) * chunk
if size:
    m = mmap.mmap(-1, size)
    zero = bytes(chunk)
    for offset in range(0, size, chunk):
        m[offset:offset + chunk] = zero
    m.close()
EOF
[ $? = 0 ] || echo "zeroing free memory stopped early; the template keeps more memory" >&2"#;

pub(crate) async fn build(client: &Client, name: &str, origin: &Origin, ca_certs: &[PathBuf]) -> Result<()> {
    let spec = TemplateFile::parse(origin.text()).with_context(|| format!("in {}", origin.describe()))?;
    let mut cas = Vec::new();
    for path in ca_certs {
        let pem = std::fs::read(path).with_context(|| format!("reading CA certificate {}", path.display()))?;
        if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
            bail!("{} is not a PEM certificate (no BEGIN CERTIFICATE line)", path.display());
        }
        cas.push(pem);
    }
    let steps = 3 + cas.len() + spec.files.len() + spec.run_steps().len() + spec.processes.len();
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{pos}/{len}] [{elapsed_precise}] {wide_msg}").expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));

    // The daemon checks the template's defaults now, not at the capture after a long build.
    let check = client.request(Method::POST, "/v1/templates/check").json(&capture_request(name, "", &spec));
    client.send(check).await.context("checking the template's defaults")?;
    bar.set_message("booting the build VM");
    let req = CreateSandbox {
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        env: spec.env.clone(),
        idle_timeout_secs: Some(0),
        cold_boot: true,
        network: Some(spec.build_policy()),
        ..Default::default()
    };
    let sandbox: Sandbox =
        client.json(Method::POST, "/v1/sandboxes", Some(&req)).await.context("creating the build VM")?;
    let id = sandbox.id.clone();
    bar.inc(1);
    let result = build_in(client, &id, name, &spec, origin, &cas, &bar).await;
    bar.finish_and_clear();
    match result {
        Ok(t) => {
            println!(
                "template {} built: {} vCPU, {} MiB, running: {}",
                t.name,
                t.vcpus,
                t.memory_mib,
                t.processes.join(", ")
            );
            Ok(())
        }
        Err(e) => {
            let _ = client.send(client.request(Method::DELETE, &format!("/v1/sandboxes/{id}"))).await;
            Err(e)
        }
    }
}

async fn build_in(
    client: &Client,
    id: &str,
    name: &str,
    spec: &TemplateFile,
    origin: &Origin,
    cas: &[Vec<u8>],
    bar: &ProgressBar,
) -> Result<Template> {
    let put = |path: String, mode: String, data: Vec<u8>| async move {
        let req = client
            .request(Method::PUT, &format!("/v1/sandboxes/{id}/files"))
            .query(&[("path", path.as_str()), ("mode", mode.as_str())])
            .body(data);
        client.send(req).await.with_context(|| format!("adding file {path}"))
    };
    for (i, pem) in cas.iter().enumerate() {
        bar.set_message("adding a CA certificate");
        put(format!("{CA_DIR}/torpor-build-{i}.crt"), "644".into(), pem.clone()).await?;
    }
    if !cas.is_empty() {
        exec_ok(client, id, "update-ca-certificates", "update-ca-certificates").await?;
        bar.inc(cas.len() as u64);
    }
    for f in &spec.files {
        bar.set_message(format!("adding {}", f.path));
        let data = match (&f.content, &f.source) {
            (Some(c), _) => c.clone().into_bytes(),
            (None, Some(src)) => origin.read(src).with_context(|| format!("file {}", f.path))?,
            (None, None) => unreachable!("checked when parsing"),
        };
        put(f.path.clone(), f.mode.clone().unwrap_or_else(|| "644".into()), data).await?;
        bar.inc(1);
    }
    for r in &spec.run_steps() {
        bar.set_message(format!("running: {}", r.command));
        let req = ExecRequest { timeout_secs: r.timeout_secs, ..shell(&r.command) };
        let (code, output) = exec(client, id, req).await?;
        if code != Some(0) {
            bail!("build command failed (exit {code:?}): {}\n--- output ---\n{}", r.command, output.trim_end());
        }
        bar.inc(1);
    }
    // What the build left in the page cache would otherwise be in every clone's memory.
    bar.set_message("dropping the build's page cache and zeroing free memory");
    exec_ok(client, id, COMPACT, "compacting the build VM's memory").await?;
    bar.inc(1);
    for p in &spec.processes {
        bar.set_message(format!("starting {} and waiting until it is ready", p.name));
        start_process(client, id, p, &spec.env).await?;
        bar.inc(1);
    }
    if !spec.preload.is_empty() {
        bar.set_message("reading the preload files into the page cache");
        let paths: Vec<String> = spec.preload.iter().map(|p| sh_quote(p)).collect();
        let script = format!("find {} -type f -exec cat {{}} + >/dev/null", paths.join(" "));
        exec_ok(client, id, &script, "preload").await?;
    }
    bar.set_message("snapshotting the running VM");
    let req = capture_request(name, id, spec);
    let t: Template = client.json(Method::POST, "/v1/templates", Some(&req)).await.context("capturing the template")?;
    bar.inc(1);
    Ok(t)
}

/// What a sandbox from `t` has running at create: `torpor-guest, chromium; agent claude-code`.
fn running(t: &Template) -> String {
    let mut text = t.processes.join(", ");
    if let Some(agent) = &t.agent {
        text.push_str(&format!("; agent {}", agent.adapter));
    }
    text
}

/// `1.4 GiB`, `310 MiB`.
fn human_bytes(n: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let mib = n as f64 / MIB;
    if mib >= 1024.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else {
        format!("{mib:.0} MiB")
    }
}

/// What `POST /v1/templates` (and `…/check`) gets for `spec`, capturing sandbox `id`.
fn capture_request(name: &str, id: &str, spec: &TemplateFile) -> CreateTemplate {
    CreateTemplate {
        name: name.to_owned(),
        sandbox: id.to_owned(),
        processes: std::iter::once("torpor-guest".to_owned())
            .chain(spec.processes.iter().map(|p| p.name.clone()))
            .collect(),
        network: spec.network.clone(),
        secrets: spec.secrets.clone(),
        github: spec.github.clone(),
        models: spec.models.clone(),
        agent: spec.agent.clone(),
    }
}

/// `value` as one shell word.
fn sh_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "'\\''"))
}

/// Starts `p` in the background of sandbox `id` (detached, output to /var/log/torpor/NAME.log)
/// and waits until its ready check passes.
/// Its environment is the template's `env` and nothing else: a process that outlives the build
/// must not carry the build VM's credentials into every clone's memory.
pub(crate) async fn start_process(
    client: &Client,
    id: &str,
    p: &ProcessSpec,
    template_env: &BTreeMap<String, String>,
) -> Result<()> {
    let mut env = BTreeMap::new();
    env.insert("TORPOR_PROCESS_COMMAND".to_owned(), p.command.clone());
    let assignments: String = template_env.iter().map(|(k, v)| format!(" {k}={}", sh_quote(v))).collect();
    let start = ExecRequest {
        argv: vec![
            "sh".into(),
            "-c".into(),
            format!(
                "mkdir -p /var/log/torpor && env -i HOME=/root PATH={CLEAN_PATH} LANG=C.UTF-8{assignments} \
                 TORPOR_PROCESS_COMMAND=\"$TORPOR_PROCESS_COMMAND\" setsid sh -c \"$TORPOR_PROCESS_COMMAND\" \
                 >/var/log/torpor/{}.log 2>&1 </dev/null &",
                p.name
            ),
        ],
        env,
        cwd: p.cwd.clone(),
        ..Default::default()
    };
    let (code, output) = exec(client, id, start).await?;
    if code != Some(0) {
        bail!("starting process {} failed: {}\n{}", p.name, p.command, output.trim_end());
    }
    let timeout = Duration::from_secs(p.ready_timeout_secs.unwrap_or(60));
    let deadline = Instant::now() + timeout;
    loop {
        let (code, output) = exec(client, id, shell(&p.ready)).await?;
        if code == Some(0) {
            break;
        }
        if Instant::now() > deadline {
            let (_, log) = exec(client, id, shell(&format!("tail -n 20 /var/log/torpor/{}.log", p.name))).await?;
            bail!(
                "process {} was not ready within {} s: `{}` last said:\n{}\n--- its log ---\n{}",
                p.name,
                timeout.as_secs(),
                p.ready,
                output.trim_end(),
                log.trim_end()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// `allowlist: github.com, 10.0.0.0/8:443` in one line.
fn describe_policy(p: &NetworkPolicy) -> String {
    let mode = match p.mode {
        NetworkMode::DenyAll => "deny-all",
        NetworkMode::Allowlist => "allowlist",
        NetworkMode::Open => "open",
    };
    let rules: Vec<&str> = p.allow_domains.iter().chain(&p.allow_cidrs).map(String::as_str).collect();
    if rules.is_empty() {
        mode.to_owned()
    } else {
        format!("{mode}: {}", rules.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::{Origin, TemplateFile};

    #[test]
    fn sources_outside_the_template_directory_are_refused() {
        let ok = "[[file]]\npath = \"/x\"\nsource = \"./files/motd\"\n";
        assert!(TemplateFile::parse(ok).is_ok(), "a leading ./ stays inside");
        for source in ["/etc/hostname", "../x", "files/../../x"] {
            let text = format!("[[file]]\npath = \"/x\"\nsource = \"{source}\"\n");
            let e = TemplateFile::parse(&text).err().unwrap_or_else(|| panic!("{source} accepted"));
            assert!(e.to_string().contains("inside the template file's directory"), "{e}");
        }
        // A symlink inside the directory that leads out of it.
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("link")).unwrap();
        std::fs::write(dir.path().join("t.toml"), "").unwrap();
        let origin = Origin::File { path: dir.path().join("t.toml"), text: String::new() };
        let e = origin.read(std::path::Path::new("link")).unwrap_err();
        assert!(e.to_string().contains("outside the template's directory"), "{e}");
        std::fs::write(dir.path().join("ok.txt"), "fine").unwrap();
        assert_eq!(origin.read(std::path::Path::new("ok.txt")).unwrap(), b"fine");
    }

    #[test]
    fn the_shipped_coder_template_is_complete() {
        let origin = Origin::shipped("coder").unwrap();
        let t = TemplateFile::parse(origin.text()).unwrap();
        for f in &t.files {
            if let Some(src) = &f.source {
                assert!(!origin.read(src).unwrap().is_empty(), "{} is empty", src.display());
            }
        }
        assert_eq!(t.agent.as_ref().map(|a| a.adapter.as_str()), Some("claude-code"));
        assert!(t.models.is_some() && t.processes.iter().any(|p| p.name == "chromium"));
        let err = Origin::shipped("nope").err().unwrap().to_string();
        assert!(err.contains("-f FILE") && err.contains("coder"), "{err}");
    }

    #[test]
    fn parses_a_full_template() {
        let t = TemplateFile::parse(
            r#"
            memory_mib = 512
            [env]
            A = "1"
            [[file]]
            path = "/srv/x"
            content = "hi"
            [[run]]
            command = "true"
            [[process]]
            name = "web"
            command = "python3 -m http.server"
            ready = "true"
            "#,
        )
        .unwrap();
        assert_eq!((t.files.len(), t.runs.len(), t.processes.len()), (1, 1, 1));
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        assert!(TemplateFile::parse("packages = [\"jq\"]").unwrap_err().to_string().contains("build_network"));
        let ok = "packages = [\"jq\"]\n[build_network]\nmode = \"allowlist\"\nallow_domains = [\"deb.debian.org\"]";
        let t = TemplateFile::parse(ok).unwrap();
        assert!(t.run_steps()[0].command.contains("install -y -q --no-install-recommends jq") && t.network.is_none());
        assert!(TemplateFile::parse("packages = [\"jq; rm -rf /\"]\n[network]\nmode = \"open\"").is_err());
        assert!(TemplateFile::parse("[[file]]\npath = \"/x\"").is_err());
        assert!(TemplateFile::parse("colour = 1").is_err());
        assert!(TemplateFile::parse("preload = [\"usr/lib\"]").unwrap_err().to_string().contains("absolute"));
        assert!(TemplateFile::parse("preload = [\"/usr/lib/x'y\"]").is_err());
        assert_eq!(TemplateFile::parse("preload = [\"/usr/lib\"]").unwrap().preload, ["/usr/lib"]);
        assert!(TemplateFile::parse("[[process]]\nname = \"a b\"\ncommand = \"x\"\nready = \"y\"").is_err());
    }
}
