//! The template file (TOML; format in docs/templates.md): what to put in the machine, what to
//! run in it and which processes to keep running.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use torpor_api::{NetworkMode, NetworkPolicy};

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
    pub github: Option<torpor_api::GitHubGrant>,
    /// Model proxy access of its sandboxes (`providers`, `token_budget`).
    pub models: Option<torpor_api::ModelGrant>,
    /// The agent its sandboxes run for relayed messages (`adapter`, `command`, `cwd`, `env`).
    pub agent: Option<torpor_api::AgentConfig>,
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
