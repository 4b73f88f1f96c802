//! What a sandbox is given beyond its device token: a GitHub token scope and model access.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::{Config, ModelFlavour};
use crate::error::ApiError;

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
const MAX_GITHUB_REPOSITORIES: usize = 500;

impl GitHubGrant {
    pub fn validate(self, cfg: &Config) -> Result<Self, ApiError> {
        if cfg.github.is_none() {
            return Err(ApiError::invalid(
                "github credentials were asked for, but the daemon has no GitHub App configured ([github] in its config)",
            ));
        }
        if self.repositories.len() > MAX_GITHUB_REPOSITORIES {
            return Err(ApiError::invalid(format!("at most {MAX_GITHUB_REPOSITORIES} github repositories")));
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
                return Err(ApiError::invalid(format!(
                    "github repository {repo:?} must be a name or owner/name (letters, digits, -, _, .)"
                )));
            }
        }
        for (permission, level) in &self.permissions {
            if permission.is_empty()
                || permission.len() > 64
                || !permission.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            {
                return Err(ApiError::invalid(format!(
                    "github permission {permission:?} must be a GitHub App permission name such as contents or pull_requests"
                )));
            }
            if !["read", "write", "admin"].contains(&level.as_str()) {
                return Err(ApiError::invalid(format!(
                    "github permission {permission} must be read, write or admin, got {level:?}"
                )));
            }
        }
        Ok(self)
    }

    /// Repository names as the token request wants them (the installation fixes the owner).
    pub fn repository_names(&self) -> Vec<String> {
        self.repositories.iter().map(|r| r.rsplit('/').next().unwrap_or(r).to_owned()).collect()
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
    /// Fills in providers and budget; every provider must be configured.
    pub fn validate(self, cfg: &Config) -> Result<Self, ApiError> {
        let configured: Vec<ModelFlavour> = cfg.models.keys().copied().collect();
        if configured.is_empty() {
            return Err(ApiError::invalid(
                "model access was asked for, but the daemon has no model upstream configured ([models.anthropic] or [models.openai] in its config)",
            ));
        }
        let mut providers = self.providers.unwrap_or_else(|| configured.clone());
        providers.sort();
        providers.dedup();
        if let Some(missing) = providers.iter().find(|p| !configured.contains(p)) {
            let names: Vec<&str> = configured.iter().map(|p| p.as_str()).collect();
            return Err(ApiError::invalid(format!(
                "model provider {} is not configured on the daemon; it has: {}",
                missing.as_str(),
                names.join(", ")
            )));
        }
        Ok(Self {
            providers: Some(providers),
            token_budget: Some(self.token_budget.unwrap_or(cfg.default_model_token_budget)),
        })
    }

    pub fn allows(&self, flavour: ModelFlavour) -> bool {
        self.providers.as_ref().is_some_and(|p| p.contains(&flavour))
    }

    /// `None`: no limit.
    pub fn budget(&self) -> Option<u64> {
        self.token_budget.filter(|b| *b > 0)
    }
}
