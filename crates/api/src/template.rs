//! Templates: snapshots of a prepared sandbox that new sandboxes start from.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{AgentConfig, GitHubGrant, Invalid, ModelGrant, NetworkPolicy};

/// The template every sandbox gets unless it names another: the base image, snapshotted with
/// its supervisor running.
pub const BASE_TEMPLATE: &str = "base";

/// 1–40 characters: lowercase letters, digits and `-`, starting with a letter or digit.
pub fn validate_template_name(name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        return Err(Invalid(format!("template name {name:?} must be 1-40 of a-z, 0-9 and -")));
    }
    if name == "check" {
        // `/v1/templates/check` is an endpoint.
        return Err(Invalid::new("template name \"check\" is reserved"));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Template {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Processes that are already running in every sandbox created from it.
    pub processes: Vec<String>,
    /// Egress policy of sandboxes created from it unless they give their own.
    pub network: NetworkPolicy,
    /// Static secrets its sandboxes receive unless they name their own.
    pub secrets: Vec<String>,
    /// GitHub token scope its sandboxes receive unless they give their own.
    pub github: Option<GitHubGrant>,
    /// Model proxy access its sandboxes receive unless they give their own.
    pub models: Option<ModelGrant>,
    /// The agent its sandboxes run.
    pub agent: Option<AgentConfig>,
    /// Host disk its snapshot takes: memory image and disk layer, allocated blocks only (the
    /// guest image it was booted from is shared by every template and not counted).
    pub size_bytes: u64,
    /// When it was built.
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplate {
    pub name: String,
    /// A running sandbox to capture; it is consumed (its snapshot becomes the template).
    /// Required, except by `POST /v1/templates/check`, which does not look at it.
    #[serde(default)]
    pub sandbox: String,
    /// Names of the processes it keeps running (shown in template listings).
    #[serde(default)]
    pub processes: Vec<String>,
    /// Default egress policy of its sandboxes; deny-all if omitted.
    pub network: Option<NetworkPolicy>,
    /// Static secrets its sandboxes receive by default.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// GitHub token scope its sandboxes receive by default.
    pub github: Option<GitHubGrant>,
    /// Model proxy access its sandboxes receive by default.
    pub models: Option<ModelGrant>,
    /// The agent its sandboxes run (`adapter`, `command`, `cwd`, `env`).
    pub agent: Option<AgentConfig>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_names() {
        assert!(validate_template_name("web-2").is_ok());
        for bad in ["", "-x", "Web", "a/b", "check", &"x".repeat(41)] {
            assert!(validate_template_name(bad).is_err(), "{bad}");
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TemplateList {
    pub templates: Vec<Template>,
}
