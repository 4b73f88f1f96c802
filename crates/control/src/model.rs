//! What the daemon makes of the API's requests: checks against its configuration (ranges,
//! configured secrets and upstreams), defaults filled in, policies in canonical form. The
//! request and response types themselves are `torpor_api`'s.

use std::collections::BTreeMap;

use torpor_api::{
    validate_env_name, validate_template_name, AgentConfig, CreateChannel, CreateSandbox, GitHubGrant, ModelFlavour,
    ModelGrant, NetworkMode, NetworkPolicy, BASE_TEMPLATE, MAX_IDLE_TIMEOUT_SECS, REGISTRIES,
};

use crate::config::Config;
use crate::error::ApiError;

/// A create request with defaults filled in and every field checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidCreate {
    pub template: String,
    /// As requested (range-checked); a template's own size applies where omitted.
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub env: BTreeMap<String, String>,
    pub idle_timeout_secs: u64,
    pub cold_boot: bool,
    /// Checked and in canonical form.
    pub network: Option<NetworkPolicy>,
    pub disk_mib: u32,
    /// Each one configured.
    pub secrets: Option<Vec<String>>,
    pub github: Option<GitHubGrant>,
    /// With its providers and budget resolved.
    pub models: Option<ModelGrant>,
    pub agent: Option<AgentConfig>,
}

/// What a template hands its sandboxes unless their create request says otherwise.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TemplateDefaults {
    pub processes: Vec<String>,
    pub network: NetworkPolicy,
    pub secrets: Vec<String>,
    pub github: Option<GitHubGrant>,
    pub models: Option<ModelGrant>,
    pub agent: Option<AgentConfig>,
}

pub fn validate_create(req: CreateSandbox, cfg: &Config) -> Result<ValidCreate, ApiError> {
    let template = req.template.unwrap_or_else(|| BASE_TEMPLATE.into());
    validate_template_name(&template).map_err(|e| ApiError::not_found(format!("unknown template: {e}")))?;
    if let Some(vcpus) = req.vcpus.filter(|v| *v == 0 || *v > cfg.max_vcpus) {
        return Err(ApiError::invalid(format!("vcpus must be between 1 and {}, got {vcpus}", cfg.max_vcpus)));
    }
    if let Some(memory_mib) = req.memory_mib.filter(|m| !(cfg.min_memory_mib..=cfg.max_memory_mib).contains(m)) {
        return Err(ApiError::invalid(format!(
            "memory_mib must be between {} and {}, got {memory_mib}",
            cfg.min_memory_mib, cfg.max_memory_mib
        )));
    }
    for key in req.env.keys() {
        validate_env_name(key)?;
    }
    let idle_timeout_secs = req.idle_timeout_secs.unwrap_or(cfg.default_idle_timeout_secs);
    if idle_timeout_secs > MAX_IDLE_TIMEOUT_SECS {
        return Err(ApiError::invalid(format!(
            "idle_timeout_secs must be at most {MAX_IDLE_TIMEOUT_SECS} (or 0 for never), got {idle_timeout_secs}"
        )));
    }
    if req.cold_boot && template != BASE_TEMPLATE {
        return Err(ApiError::invalid(format!("template {template:?} is a snapshot and cannot be cold-booted")));
    }
    let network = req.network.map(|n| n.canonical(&cfg.package_registries)).transpose()?;
    let disk_mib = req.disk_mib.unwrap_or(cfg.default_disk_mib);
    if !(64..=cfg.max_disk_mib).contains(&disk_mib) {
        return Err(ApiError::invalid(format!("disk_mib must be between 64 and {}, got {disk_mib}", cfg.max_disk_mib)));
    }
    if let Some(names) = &req.secrets {
        validate_secret_names(names, cfg)?;
    }
    let github = req.github.map(|g| github_grant(g, cfg)).transpose()?;
    let models = req.models.map(|m| model_grant(m, cfg)).transpose()?;
    if let Some(agent) = &req.agent {
        agent.validate()?;
    }
    Ok(ValidCreate {
        agent: req.agent,
        github,
        models,
        secrets: req.secrets,
        disk_mib,
        network,
        template,
        vcpus: req.vcpus,
        memory_mib: req.memory_mib,
        env: req.env,
        idle_timeout_secs,
        cold_boot: req.cold_boot,
    })
}

/// Every name must be a secret the daemon is configured with (its value never appears here).
pub fn validate_secret_names(names: &[String], cfg: &Config) -> Result<(), ApiError> {
    for name in names {
        if !cfg.secrets.contains_key(name) {
            let known: Vec<&str> = cfg.secrets.keys().map(String::as_str).collect();
            return Err(ApiError::invalid(format!(
                "unknown secret {name:?}; the daemon is configured with: {}",
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            )));
        }
    }
    Ok(())
}

/// A GitHub token scope, when the daemon has a GitHub App to mint it with.
pub fn github_grant(grant: GitHubGrant, cfg: &Config) -> Result<GitHubGrant, ApiError> {
    if cfg.github.is_none() {
        return Err(ApiError::invalid(
            "github credentials were asked for, but the daemon has no GitHub App configured ([github] in its config)",
        ));
    }
    grant.validate()?;
    Ok(grant)
}

/// Model access with providers and budget filled in; every provider must be configured.
pub fn model_grant(grant: ModelGrant, cfg: &Config) -> Result<ModelGrant, ApiError> {
    let configured: Vec<ModelFlavour> = cfg.models.keys().copied().collect();
    if configured.is_empty() {
        return Err(ApiError::invalid(
            "model access was asked for, but the daemon has no model upstream configured ([models.anthropic] or [models.openai] in its config)",
        ));
    }
    let mut providers = grant.providers.unwrap_or_else(|| configured.clone());
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
    Ok(ModelGrant {
        providers: Some(providers),
        token_budget: Some(grant.token_budget.unwrap_or(cfg.default_model_token_budget)),
    })
}

pub fn validate_channel(spec: &CreateChannel, cfg: &Config) -> Result<(), ApiError> {
    let secrets = spec.validate()?;
    validate_secret_names(&secrets, cfg)
}

/// A policy as the firewall enforces it, and in the canonical form the daemon stores.
pub trait PolicyExt: Sized {
    fn to_egress(&self) -> Result<torpor_net::EgressPolicy, ApiError>;
    /// Checked, with every entry in canonical form (lower case, networks masked, no
    /// duplicates), and `@registries` replaced by the daemon's `package_registries`.
    fn canonical(self, registries: &[String]) -> Result<Self, ApiError>;
    /// Canonical, with `@registries` left in (a template's default, expanded at each create).
    fn canonical_keeping_registries(self) -> Result<Self, ApiError>;
}

impl PolicyExt for NetworkPolicy {
    fn to_egress(&self) -> Result<torpor_net::EgressPolicy, ApiError> {
        let mode = match self.mode {
            NetworkMode::DenyAll => torpor_net::EgressMode::DenyAll,
            NetworkMode::Allowlist => torpor_net::EgressMode::Allowlist,
            NetworkMode::Open => torpor_net::EgressMode::Open,
        };
        torpor_net::EgressPolicy::parse(mode, &self.allow_domains, &self.allow_cidrs)
            .map_err(|e| ApiError::invalid(format!("network policy: {e}")))
    }

    fn canonical(mut self, registries: &[String]) -> Result<Self, ApiError> {
        if self.allow_domains.iter().any(|d| d == REGISTRIES) {
            self.allow_domains.retain(|d| d != REGISTRIES);
            self.allow_domains.extend(registries.iter().cloned());
        }
        canonical_as_is(self)
    }

    fn canonical_keeping_registries(mut self) -> Result<Self, ApiError> {
        let registries = self.allow_domains.iter().any(|d| d == REGISTRIES);
        self.allow_domains.retain(|d| d != REGISTRIES);
        let mut policy = canonical_as_is(self)?;
        if registries {
            policy.allow_domains.insert(0, REGISTRIES.to_owned());
        }
        Ok(policy)
    }
}

fn canonical_as_is(policy: NetworkPolicy) -> Result<NetworkPolicy, ApiError> {
    let parsed = policy.to_egress()?;
    Ok(NetworkPolicy {
        mode: policy.mode,
        allow_domains: parsed.domains.iter().map(|d| d.to_string()).collect(),
        allow_cidrs: parsed.cidrs.iter().map(|c| c.to_string()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_expand_to_the_configured_names() {
        let policy = NetworkPolicy {
            mode: NetworkMode::Allowlist,
            allow_domains: vec!["GitHub.com".into(), REGISTRIES.into()],
            allow_cidrs: vec![],
        };
        let registries = vec!["pypi.org".to_owned(), "registry.npmjs.org".to_owned()];
        let c = policy.clone().canonical(&registries).unwrap();
        assert_eq!(c.allow_domains, ["github.com", "pypi.org", "registry.npmjs.org"]);
        // With none configured it allows nothing more, and no other `@` name is accepted.
        assert_eq!(policy.canonical(&[]).unwrap().allow_domains, ["github.com"]);
        let bad = NetworkPolicy { allow_domains: vec!["@mirrors".into()], ..Default::default() };
        assert!(NetworkPolicy { mode: NetworkMode::Allowlist, ..bad }.canonical(&registries).is_err());
        // A template keeps the name, for each create to expand with the setting of the day.
        let kept = NetworkPolicy {
            mode: NetworkMode::Allowlist,
            allow_domains: vec!["b.example".into(), REGISTRIES.into(), "A.example".into()],
            allow_cidrs: vec![],
        };
        let kept = kept.canonical_keeping_registries().unwrap();
        assert_eq!(kept.allow_domains, [REGISTRIES, "b.example", "a.example"]);
        assert_eq!(kept.canonical(&registries).unwrap().allow_domains.len(), 4);
    }

    #[test]
    fn create_fills_defaults_and_checks_ranges() {
        let cfg = Config::default();
        let v = validate_create(CreateSandbox::default(), &cfg).unwrap();
        assert_eq!((v.template.as_str(), v.vcpus, v.memory_mib, v.idle_timeout_secs), ("base", None, None, 300));
        let bad = |req: CreateSandbox| validate_create(req, &cfg).unwrap_err();
        assert_eq!(bad(CreateSandbox { idle_timeout_secs: Some(u64::MAX), ..Default::default() }).status.as_u16(), 400);
        assert_eq!(bad(CreateSandbox { vcpus: Some(0), ..Default::default() }).status.as_u16(), 400);
        assert_eq!(bad(CreateSandbox { vcpus: Some(99), ..Default::default() }).status.as_u16(), 400);
        assert_eq!(bad(CreateSandbox { memory_mib: Some(1), ..Default::default() }).status.as_u16(), 400);
        assert_eq!(bad(CreateSandbox { template: Some("No Such".into()), ..Default::default() }).status.as_u16(), 404);
        let cold = CreateSandbox { template: Some("web".into()), cold_boot: true, ..Default::default() };
        assert_eq!(bad(cold).status.as_u16(), 400);
        let env = BTreeMap::from([("1BAD".to_string(), "x".to_string())]);
        assert_eq!(bad(CreateSandbox { env, ..Default::default() }).status.as_u16(), 400);
        let network = NetworkPolicy {
            mode: NetworkMode::Allowlist,
            allow_domains: vec!["bad name".into()],
            ..Default::default()
        };
        assert_eq!(bad(CreateSandbox { network: Some(network), ..Default::default() }).status.as_u16(), 400);
        let network = NetworkPolicy {
            mode: NetworkMode::Allowlist,
            allow_domains: vec!["API.Example.com.".into()],
            allow_cidrs: vec!["10.1.2.3/8:443".into()],
        };
        let v = validate_create(CreateSandbox { network: Some(network), ..Default::default() }, &cfg).unwrap();
        let n = v.network.unwrap();
        assert_eq!((n.allow_domains[0].as_str(), n.allow_cidrs[0].as_str()), ("api.example.com", "10.0.0.0/8:443"));
    }
}
