//! What a sandbox is given beyond its device token (a GitHub token scope, model access) and the
//! agent its supervisor runs. Whether the daemon can give it is checked by the daemon.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{validate_env_name, validate_guest_path, Invalid};

/// The scope of a sandbox's GitHub App installation token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GitHubGrant {
    /// Repositories of the app's installation the token may reach (`name` or `owner/name`);
    /// empty: every repository the installation reaches.
    #[serde(default)]
    pub repositories: Vec<String>,
    /// GitHub App permissions, e.g. `{"contents": "write", "pull_requests": "write"}`; empty:
    /// all of the installation's.
    #[serde(default)]
    pub permissions: BTreeMap<String, String>,
}

/// GitHub refuses more in one token.
pub const MAX_GITHUB_REPOSITORIES: usize = 500;

impl GitHubGrant {
    /// Names and levels GitHub could accept.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.repositories.len() > MAX_GITHUB_REPOSITORIES {
            return Err(Invalid(format!("at most {MAX_GITHUB_REPOSITORIES} github repositories")));
        }
        let part_ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 100
                && p != "."
                && p != ".."
                && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        for repo in &self.repositories {
            let ok = match repo.split_once('/') {
                Some((owner, name)) => part_ok(owner) && part_ok(name),
                None => part_ok(repo),
            };
            if !ok {
                return Err(Invalid(format!(
                    "github repository {repo:?} must be a name or owner/name (letters, digits, -, _, .)"
                )));
            }
        }
        for (permission, level) in &self.permissions {
            if permission.is_empty()
                || permission.len() > 64
                || !permission.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            {
                return Err(Invalid(format!(
                    "github permission {permission:?} must be a GitHub App permission name such as contents or pull_requests"
                )));
            }
            if !["read", "write", "admin"].contains(&level.as_str()) {
                return Err(Invalid(format!(
                    "github permission {permission} must be read, write or admin, got {level:?}"
                )));
            }
        }
        Ok(())
    }

    /// Repository names as the token request wants them (the installation fixes the owner).
    pub fn repository_names(&self) -> Vec<String> {
        self.repositories.iter().map(|r| r.rsplit('/').next().unwrap_or(r).to_owned()).collect()
    }
}

/// The wire format a model upstream speaks, which is also the name of its endpoint in the proxy.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize, ToSchema, strum::IntoStaticStr,
)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum ModelFlavour {
    /// The Anthropic Messages API.
    Anthropic,
    /// The OpenAI API (chat completions, responses, …).
    Openai,
}

impl ModelFlavour {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// A sandbox's access to the model proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelGrant {
    /// Which of the daemon's configured model APIs; all of them if omitted.
    pub providers: Option<Vec<ModelFlavour>>,
    /// Tokens (input + output) the sandbox may spend; the daemon's
    /// `default_model_token_budget` if omitted; 0 = no limit.
    pub token_budget: Option<u64>,
}

impl ModelGrant {
    pub fn allows(&self, flavour: ModelFlavour) -> bool {
        self.providers.as_ref().is_some_and(|p| p.contains(&flavour))
    }

    /// `None`: no limit.
    pub fn budget(&self) -> Option<u64> {
        self.token_budget.filter(|b| *b > 0)
    }
}

/// How the supervisor runs the sandbox's agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// `echo`, `command` (a program speaking JSON lines), `claude-code` or `codex`.
    pub adapter: String,
    /// `command`: the program and its arguments; others: optionally the CLI's path.
    #[serde(default)]
    pub command: Vec<String>,
    /// Working directory of the agent (absolute; default /root).
    pub cwd: Option<String>,
    /// Environment of the agent, on top of the sandbox's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// The adapters the guest supervisor knows.
pub const AGENT_ADAPTERS: [&str; 4] = ["echo", "command", "claude-code", "codex"];

impl AgentConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        if !AGENT_ADAPTERS.contains(&self.adapter.as_str()) {
            return Err(Invalid(format!(
                "agent adapter {:?} is not one of {}",
                self.adapter,
                AGENT_ADAPTERS.join(", ")
            )));
        }
        if self.adapter == "command" && self.command.first().is_none_or(|c| c.is_empty()) {
            return Err(Invalid::new("the command adapter needs `command`: the program and its arguments"));
        }
        if let Some(cwd) = &self.cwd {
            validate_guest_path(cwd)?;
        }
        for key in self.env.keys() {
            validate_env_name(key)?;
        }
        Ok(())
    }
}
