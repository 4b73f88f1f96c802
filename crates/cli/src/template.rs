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
    /// Build template NAME from a template file (format: README, "Pause, resume and templates").
    Build {
        /// Template name: 1-40 of a-z, 0-9 and -.
        name: String,
        /// The template file (TOML).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
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
                    "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {}",
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
        TemplateCommand::Build { name, file } => build(&client, &name, &file).await,
        TemplateCommand::List { json } => {
            let list: serde_json::Value = client.json(Method::GET, "/v1/templates", None::<&()>).await?;
            let templates: Vec<Template> = serde_json::from_value(list["templates"].clone())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&templates)?);
            } else {
                println!(
                    "{:<20} {:>5} {:>8}  {:<20} {:<24} NETWORK",
                    "NAME", "VCPUS", "MEMORY", "CREATED", "PROCESSES"
                );
                for t in templates {
                    println!(
                        "{:<20} {:>5} {:>7}M  {:<20} {:<24} {}",
                        t.name,
                        t.vcpus,
                        t.memory_mib,
                        t.created_at.format("%Y-%m-%d %H:%M:%S"),
                        t.processes.join(", "),
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
async fn exec(client: &Client, id: &str, req: ExecRequest) -> Result<(Option<i32>, String)> {
    let (out, err, exit) = client.exec_collect(id, &req).await?;
    let code = match exit {
        ExecEvent::Exit { code, .. } => code,
        _ => None,
    };
    Ok((code, format!("{}{}", String::from_utf8_lossy(&out), String::from_utf8_lossy(&err))))
}

fn shell(command: &str) -> ExecRequest {
    ExecRequest { argv: vec!["sh".into(), "-c".into(), command.into()], ..Default::default() }
}

async fn build(client: &Client, name: &str, file: &Path) -> Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let spec = TemplateFile::parse(&text).with_context(|| format!("in {}", file.display()))?;
    let base_dir = file.parent().unwrap_or(Path::new("."));
    let steps = 2 + spec.files.len() + spec.run_steps().len() + spec.processes.len();
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{pos}/{len}] [{elapsed_precise}] {wide_msg}").expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));

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
    let result = build_in(client, &id, name, &spec, base_dir, &bar).await;
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
    base_dir: &Path,
    bar: &ProgressBar,
) -> Result<Template> {
    for f in &spec.files {
        bar.set_message(format!("adding {}", f.path));
        let data = match (&f.content, &f.source) {
            (Some(c), _) => c.clone().into_bytes(),
            (None, Some(src)) => {
                let path = base_dir.join(src);
                std::fs::read(&path).with_context(|| format!("file {}: reading {}", f.path, path.display()))?
            }
            (None, None) => unreachable!("checked when parsing"),
        };
        let mode = f.mode.clone().unwrap_or_else(|| "644".into());
        let req = client
            .request(Method::PUT, &format!("/v1/sandboxes/{id}/files"))
            .query(&[("path", f.path.as_str()), ("mode", mode.as_str())])
            .body(data);
        client.send(req).await.with_context(|| format!("adding file {}", f.path))?;
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
    for p in &spec.processes {
        bar.set_message(format!("starting {} and waiting until it is ready", p.name));
        let mut env = BTreeMap::new();
        env.insert("TORPOR_PROCESS_COMMAND".to_owned(), p.command.clone());
        let start = ExecRequest {
            argv: vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "mkdir -p /var/log/torpor && setsid sh -c \"$TORPOR_PROCESS_COMMAND\" >/var/log/torpor/{}.log 2>&1 </dev/null &",
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
        bar.inc(1);
    }
    bar.set_message("snapshotting the running VM");
    let req = CreateTemplate {
        name: name.to_owned(),
        sandbox: id.to_owned(),
        processes: spec.processes.iter().map(|p| p.name.clone()).collect(),
        network: spec.network.clone(),
        secrets: spec.secrets.clone(),
        github: spec.github.clone(),
        models: spec.models.clone(),
        agent: spec.agent.clone(),
    };
    let t: Template = client.json(Method::POST, "/v1/templates", Some(&req)).await.context("capturing the template")?;
    bar.inc(1);
    Ok(t)
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
    use super::TemplateFile;

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
        assert!(t.run_steps()[0].command.contains("apt-get install") && t.network.is_none());
        assert!(TemplateFile::parse("packages = [\"jq; rm -rf /\"]\n[network]\nmode = \"open\"").is_err());
        assert!(TemplateFile::parse("[[file]]\npath = \"/x\"").is_err());
        assert!(TemplateFile::parse("colour = 1").is_err());
        assert!(TemplateFile::parse("[[process]]\nname = \"a b\"\ncommand = \"x\"\nready = \"y\"").is_err());
    }
}
