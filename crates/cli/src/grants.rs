//! Flags naming the short-lived credentials a sandbox receives: a GitHub installation token and
//! access to the model proxy. With none given, the template's defaults apply.

use anyhow::{bail, Result};
use clap::Args;
use torpor_api::ModelFlavour;
use torpor_api::{AgentConfig, GitHubGrant, ModelGrant};

#[derive(Args, Debug, Clone, Default)]
pub struct GrantArgs {
    /// Give the sandbox a GitHub App installation token (GITHUB_TOKEN, and git's credential
    /// helper) for this repository, `name` or `owner/name` (repeatable).
    #[arg(long = "github-repo", value_name = "REPO")]
    pub github_repos: Vec<String>,
    /// A permission of that token, NAME=read|write|admin, e.g. contents=write (repeatable;
    /// default: all of the installation's).
    #[arg(long = "github-permission", value_name = "NAME=LEVEL")]
    pub github_permissions: Vec<String>,
    /// A GitHub token for every repository of the installation (instead of --github-repo).
    #[arg(long = "github-all-repos")]
    pub github_all_repos: bool,
    /// Reach this model API through Torpor's proxy: anthropic, openai or all (repeatable).
    /// The sandbox gets ANTHROPIC_BASE_URL/ANTHROPIC_API_KEY (or OPENAI_…) pointing at it.
    #[arg(long = "model", value_name = "PROVIDER", value_parser = ["anthropic", "openai", "all"])]
    pub models: Vec<String>,
    /// Most tokens (input + output) the sandbox may spend through the proxy; 0 = no limit
    /// (default from the daemon's config).
    #[arg(long = "model-budget", value_name = "TOKENS")]
    pub model_budget: Option<u64>,
    #[command(flatten)]
    pub agent: AgentArgs,
}

/// The agent that relayed messages go to.
#[derive(Args, Debug, Clone, Default)]
pub struct AgentArgs {
    /// The agent relayed messages go to: echo, command, claude-code or codex (default: the
    /// template's).
    #[arg(long = "agent", value_name = "ADAPTER", value_parser = ["echo", "command", "claude-code", "codex"])]
    pub agent: Option<String>,
    /// The agent's program and arguments, split at spaces (needed by `--agent command`;
    /// optional for the others, whose CLI it replaces).
    #[arg(long = "agent-command", value_name = "COMMAND", requires = "agent")]
    pub agent_command: Option<String>,
}

impl GrantArgs {
    pub fn github(&self) -> Result<Option<GitHubGrant>> {
        if self.github_repos.is_empty() && !self.github_all_repos {
            if !self.github_permissions.is_empty() {
                bail!("--github-permission needs --github-repo or --github-all-repos");
            }
            return Ok(None);
        }
        if self.github_all_repos && !self.github_repos.is_empty() {
            bail!("give either --github-repo or --github-all-repos, not both");
        }
        let mut permissions = std::collections::BTreeMap::new();
        for p in &self.github_permissions {
            let Some((name, level)) = p.split_once('=') else {
                bail!("--github-permission expects NAME=LEVEL (e.g. contents=write), got {p:?}")
            };
            permissions.insert(name.to_owned(), level.to_owned());
        }
        Ok(Some(GitHubGrant { repositories: self.github_repos.clone(), permissions }))
    }
}

impl AgentArgs {
    pub fn agent(&self) -> Option<AgentConfig> {
        let adapter = self.agent.clone()?;
        let command = self.agent_command.as_deref().map(|c| c.split_whitespace().map(str::to_owned).collect());
        Some(AgentConfig { adapter, command: command.unwrap_or_default(), ..Default::default() })
    }
}

impl GrantArgs {
    pub fn models(&self) -> Option<ModelGrant> {
        if self.models.is_empty() && self.model_budget.is_none() {
            return None;
        }
        let providers = if self.models.is_empty() || self.models.iter().any(|m| m == "all") {
            None
        } else {
            Some(
                self.models
                    .iter()
                    .map(|m| if m == "anthropic" { ModelFlavour::Anthropic } else { ModelFlavour::Openai })
                    .collect(),
            )
        };
        Some(ModelGrant { providers, token_budget: self.model_budget })
    }
}
