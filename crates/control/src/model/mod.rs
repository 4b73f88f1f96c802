//! The public shapes of the API. These serialise to the stable JSON documented in the README and
//! the OpenAPI document; add fields, never rename or remove them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::Config;
use crate::error::ApiError;

mod channels;
mod grants;
pub use channels::*;
pub use grants::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Creating,
    Running,
    Pausing,
    Paused,
    Resuming,
    Stopping,
    Stopped,
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Creating => "creating",
            State::Running => "running",
            State::Pausing => "pausing",
            State::Paused => "paused",
            State::Resuming => "resuming",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        [
            State::Creating,
            State::Running,
            State::Pausing,
            State::Paused,
            State::Resuming,
            State::Stopping,
            State::Stopped,
            State::Failed,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NetworkInfo {
    /// Address of the guest inside its VM (the same in every sandbox).
    pub guest_ip: String,
    /// Host-side address through which the host reaches this sandbox's supervisor.
    pub host_address: Option<String>,
}

/// What the sandbox's VM process may use on the host (its cgroup and disk quota).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Limits {
    /// CPU time per 100 ms period, in µs (vCPUs × 100 000).
    pub cpu_quota_us: u64,
    /// Guest RAM plus the VMM's overhead.
    pub memory_bytes: u64,
    pub pids: u64,
    /// Disk I/O weight (1-1000, 100 is an even share).
    pub io_weight: u16,
    /// Most bytes its disk layer may take on the host.
    pub disk_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Sandbox {
    pub id: String,
    pub state: State,
    /// Why the sandbox failed; only set when `state` is `failed`.
    pub reason: Option<String>,
    pub template: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Names of the default environment variables (values are not echoed back).
    pub env_keys: Vec<String>,
    /// `kvm` or `tcg`.
    pub accelerator: String,
    /// PID of the VM process while it runs.
    pub pid: Option<u32>,
    /// Seconds without API calls, execs or relay traffic before the sandbox pauses; 0 = never.
    pub idle_timeout_secs: u64,
    pub network: NetworkInfo,
    pub limits: Limits,
    /// Names of the static secrets it receives (never their values).
    pub secrets: Vec<String>,
    /// The GitHub installation token it receives, if any: its scope.
    pub github: Option<GitHubGrant>,
    /// The model APIs it reaches through the proxy, if any, and its token budget.
    pub models: Option<ModelGrant>,
    /// The agent its supervisor runs for relayed messages, if any.
    pub agent: Option<AgentConfig>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// Template to boot; `base` if omitted.
    pub template: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    /// Default environment for every exec in the sandbox.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Pause after this many idle seconds (default 300; 0 = never).
    pub idle_timeout_secs: Option<u64>,
    /// Boot the `base` image from scratch instead of restoring the base template snapshot.
    #[serde(default)]
    pub cold_boot: bool,
    /// Egress policy; the template's default (else deny-all) if omitted.
    pub network: Option<NetworkPolicy>,
    /// Disk quota in MiB: the sandbox's writes to its disk cannot take more host disk than this
    /// (default from the daemon's config: 4096). Past it, writes fail in the guest with an I/O
    /// error.
    pub disk_mib: Option<u32>,
    /// Names of the host's static secrets (daemon config `[secrets]`) the sandbox receives as
    /// environment variables and files in /run/torpor/credentials; the template's if omitted.
    pub secrets: Option<Vec<String>>,
    /// A GitHub App installation token (`GITHUB_TOKEN`, and git's credential helper) scoped to
    /// these repositories and permissions; the template's if omitted.
    pub github: Option<GitHubGrant>,
    /// Model APIs through the proxy (`ANTHROPIC_BASE_URL` + `ANTHROPIC_API_KEY`, `OPENAI_…`);
    /// the template's if omitted.
    pub models: Option<ModelGrant>,
    /// The agent relayed messages go to; the template's if omitted.
    pub agent: Option<AgentConfig>,
}

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

/// Longest idle timeout accepted: 30 days (0 means never, for longer).
pub const MAX_IDLE_TIMEOUT_SECS: u64 = 30 * 24 * 3600;

impl CreateSandbox {
    pub fn validate(self, cfg: &Config) -> Result<ValidCreate, ApiError> {
        let template = self.template.unwrap_or_else(|| BASE_TEMPLATE.into());
        validate_template_name(&template)
            .map_err(|e| ApiError::not_found(format!("unknown template: {}", e.message)))?;
        if let Some(vcpus) = self.vcpus.filter(|v| *v == 0 || *v > cfg.max_vcpus) {
            return Err(ApiError::invalid(format!("vcpus must be between 1 and {}, got {vcpus}", cfg.max_vcpus)));
        }
        if let Some(memory_mib) = self.memory_mib.filter(|m| !(cfg.min_memory_mib..=cfg.max_memory_mib).contains(m)) {
            return Err(ApiError::invalid(format!(
                "memory_mib must be between {} and {}, got {memory_mib}",
                cfg.min_memory_mib, cfg.max_memory_mib
            )));
        }
        for key in self.env.keys() {
            validate_env_name(key)?;
        }
        let idle_timeout_secs = self.idle_timeout_secs.unwrap_or(cfg.default_idle_timeout_secs);
        if idle_timeout_secs > MAX_IDLE_TIMEOUT_SECS {
            return Err(ApiError::invalid(format!(
                "idle_timeout_secs must be at most {MAX_IDLE_TIMEOUT_SECS} (or 0 for never), got {idle_timeout_secs}"
            )));
        }
        if self.cold_boot && template != BASE_TEMPLATE {
            return Err(ApiError::invalid(format!("template {template:?} is a snapshot and cannot be cold-booted")));
        }
        let network = self.network.map(|n| n.canonical(&cfg.package_registries)).transpose()?;
        let disk_mib = self.disk_mib.unwrap_or(cfg.default_disk_mib);
        if !(64..=cfg.max_disk_mib).contains(&disk_mib) {
            return Err(ApiError::invalid(format!(
                "disk_mib must be between 64 and {}, got {disk_mib}",
                cfg.max_disk_mib
            )));
        }
        if let Some(names) = &self.secrets {
            validate_secret_names(names, cfg)?;
        }
        let github = self.github.map(|g| g.validate(cfg)).transpose()?;
        let models = self.models.map(|m| m.validate(cfg)).transpose()?;
        if let Some(agent) = &self.agent {
            agent.validate()?;
        }
        Ok(ValidCreate {
            agent: self.agent,
            github,
            models,
            secrets: self.secrets,
            disk_mib,
            network,
            template,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            env: self.env,
            idle_timeout_secs,
            cold_boot: self.cold_boot,
        })
    }
}

/// What a sandbox may reach. See docs/network.md.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkMode {
    /// Nothing: no connection leaves the sandbox and no name resolves.
    #[default]
    DenyAll,
    /// Only `allow_domains` (resolved through the sandbox's resolver) and `allow_cidrs`.
    Allowlist,
    /// Any public address. Private, link-local, multicast and host addresses stay blocked
    /// unless `allow_cidrs` names them.
    Open,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    #[serde(default)]
    pub mode: NetworkMode,
    /// Names the sandbox may resolve and connect to: `api.example.com`, or `*.example.com` for
    /// every name below example.com.
    #[serde(default)]
    pub allow_domains: Vec<String>,
    /// IPv4 networks the sandbox may reach, optionally on a port or port range (TCP and UDP):
    /// `203.0.113.0/24`, `10.0.0.5:5432`, `10.0.0.0/8:8000-8100`. These override the
    /// always-blocked ranges.
    #[serde(default)]
    pub allow_cidrs: Vec<String>,
}

/// In `allow_domains`: every name of the daemon's `package_registries`.
pub const REGISTRIES: &str = "@registries";

impl NetworkPolicy {
    pub fn to_egress(&self) -> Result<torpor_net::EgressPolicy, ApiError> {
        let mode = match self.mode {
            NetworkMode::DenyAll => torpor_net::EgressMode::DenyAll,
            NetworkMode::Allowlist => torpor_net::EgressMode::Allowlist,
            NetworkMode::Open => torpor_net::EgressMode::Open,
        };
        torpor_net::EgressPolicy::parse(mode, &self.allow_domains, &self.allow_cidrs)
            .map_err(|e| ApiError::invalid(format!("network policy: {e}")))
    }

    /// Checked, with every entry in canonical form (lower case, networks masked, no duplicates),
    /// and `@registries` replaced by the daemon's `package_registries`.
    pub fn canonical(mut self, registries: &[String]) -> Result<Self, ApiError> {
        if self.allow_domains.iter().any(|d| d == REGISTRIES) {
            self.allow_domains.retain(|d| d != REGISTRIES);
            self.allow_domains.extend(registries.iter().cloned());
        }
        self.canonical_as_is()
    }

    /// Canonical, with `@registries` left in (a template's default, expanded at each create).
    pub fn canonical_keeping_registries(mut self) -> Result<Self, ApiError> {
        let registries = self.allow_domains.iter().any(|d| d == REGISTRIES);
        self.allow_domains.retain(|d| d != REGISTRIES);
        let mut policy = self.canonical_as_is()?;
        if registries {
            policy.allow_domains.insert(0, REGISTRIES.to_owned());
        }
        Ok(policy)
    }

    fn canonical_as_is(self) -> Result<Self, ApiError> {
        let parsed = self.to_egress()?;
        Ok(Self {
            mode: self.mode,
            allow_domains: parsed.domains.iter().map(|d| d.to_string()).collect(),
            allow_cidrs: parsed.cidrs.iter().map(|c| c.to_string()).collect(),
        })
    }
}

/// A sandbox's policy and what its resolver has let it reach.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NetworkStatus {
    #[serde(flatten)]
    pub policy: NetworkPolicy,
    /// Whether exactly this policy is in force in a live firewall now (false while stopped: it
    /// applies when the sandbox starts; false after a failed change, which leaves deny-all).
    pub enforced: bool,
    /// Addresses the sandbox may connect to because it resolved an allowed name.
    pub resolved: Vec<ResolvedAddress>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ResolvedAddress {
    pub address: String,
    pub names: Vec<String>,
    pub expires_in_secs: u64,
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

/// The template every sandbox gets unless it names another: the base image, snapshotted with
/// its supervisor running.
pub const BASE_TEMPLATE: &str = "base";

/// 1–40 characters: lowercase letters, digits and `-`, starting with a letter or digit.
pub fn validate_template_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        return Err(ApiError::invalid(format!("template name {name:?} must be 1-40 of a-z, 0-9 and -")));
    }
    if name == "check" {
        // `/v1/templates/check` is an endpoint.
        return Err(ApiError::invalid("template name \"check\" is reserved"));
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

pub fn validate_env_name(key: &str) -> Result<(), ApiError> {
    let ok = !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!("invalid environment variable name {key:?}: use letters, digits and _")))
    }
}

/// Guest paths must be absolute: there is no working directory to be relative to.
pub fn validate_guest_path(path: &str) -> Result<(), ApiError> {
    if path.is_empty() {
        return Err(ApiError::invalid("guest path must not be empty"));
    }
    if !path.starts_with('/') {
        return Err(ApiError::invalid(format!("guest path must be absolute, got {path:?}")));
    }
    if path.contains('\0') {
        return Err(ApiError::invalid("guest path must not contain NUL"));
    }
    Ok(())
}

const ID_ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
pub const ID_PREFIX: &str = "sb-";

/// `sb-` and 10 characters from an unambiguous alphabet (50 bits of randomness).
pub fn new_sandbox_id() -> String {
    let mut rng = rand::thread_rng();
    let suffix: String = (0..10).map(|_| ID_ALPHABET[rng.gen_range(0..ID_ALPHABET.len())] as char).collect();
    format!("{ID_PREFIX}{suffix}")
}

pub fn is_valid_sandbox_id(id: &str) -> bool {
    id.strip_prefix(ID_PREFIX).is_some_and(|s| s.len() == 10 && s.bytes().all(|b| ID_ALPHABET.contains(&b)))
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; no shell is involved unless you name one.
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; the user's home if omitted.
    pub cwd: Option<String>,
    /// User name or uid; root if omitted.
    pub user: Option<String>,
    /// Base64 data written to the process's stdin before it is closed (POST /exec only).
    pub stdin: Option<String>,
    /// Kill the process (and its process group) after this many seconds.
    pub timeout_secs: Option<f64>,
}

impl ExecRequest {
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(ApiError::invalid("argv must name a program"));
        }
        for key in self.env.keys() {
            validate_env_name(key)?;
        }
        if let Some(cwd) = &self.cwd {
            validate_guest_path(cwd)?;
        }
        if let Some(t) = self.timeout_secs {
            if !(t > 0.0 && t.is_finite()) {
                return Err(ApiError::invalid("timeout_secs must be a positive number"));
            }
        }
        Ok(())
    }
}

/// One line of an exec's output stream (NDJSON on POST, a text frame on the WebSocket).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    Started {
        exec_id: String,
        pid: u32,
    },
    /// Base64 bytes.
    Stdout {
        data: String,
    },
    /// Base64 bytes.
    Stderr {
        data: String,
    },
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
    Error {
        message: String,
    },
}

/// What a WebSocket client may send after its first (ExecRequest) message.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecClientMessage {
    Stdin { data: String },
    StdinEof,
    Signal { signal: i32 },
}

/// What a bill would be computed from.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct Usage {
    pub id: String,
    /// Seconds spent running (not paused, stopped or failed).
    pub running_seconds: f64,
    pub vcpu_seconds: f64,
    pub memory_gib_seconds: f64,
    /// Bytes the sandbox stores right now if it is paused (disk layer and snapshot), else 0.
    pub paused_bytes: u64,
    /// Sum over paused intervals of bytes stored × seconds.
    pub paused_byte_seconds: f64,
    /// Bytes on the host's disk right now (disk layer, snapshot, logs).
    pub storage_bytes: u64,
    pub resumes: u64,
    pub limits: Limits,
    /// Requests through the model proxy, and the tokens their answers reported.
    pub model_requests: u64,
    pub model_input_tokens: u64,
    pub model_output_tokens: u64,
    /// Tokens (input + output) it may spend through the proxy; absent: no limit.
    pub model_token_budget: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct SignalRequest {
    pub signal: i32,
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
    fn ids_are_valid_and_distinct() {
        let a = new_sandbox_id();
        let b = new_sandbox_id();
        assert!(is_valid_sandbox_id(&a), "{a}");
        assert_ne!(a, b);
        assert!(!is_valid_sandbox_id("sb-short"));
        assert!(!is_valid_sandbox_id("../../etc/pa"));
        assert!(!is_valid_sandbox_id("sb-ABCDEFGHJK"));
    }

    #[test]
    fn create_fills_defaults_and_checks_ranges() {
        let cfg = Config::default();
        let v = CreateSandbox::default().validate(&cfg).unwrap();
        assert_eq!((v.template.as_str(), v.vcpus, v.memory_mib, v.idle_timeout_secs), ("base", None, None, 300));
        let bad = |req: CreateSandbox| req.validate(&cfg).unwrap_err();
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
        let v = CreateSandbox { network: Some(network), ..Default::default() }.validate(&cfg).unwrap();
        let n = v.network.unwrap();
        assert_eq!((n.allow_domains[0].as_str(), n.allow_cidrs[0].as_str()), ("api.example.com", "10.0.0.0/8:443"));
    }

    #[test]
    fn template_names() {
        assert!(validate_template_name("web-2").is_ok());
        for bad in ["", "-x", "Web", "a/b", &"x".repeat(41)] {
            assert!(validate_template_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn guest_paths_must_be_absolute() {
        assert!(validate_guest_path("").is_err());
        assert!(validate_guest_path("tmp/x").is_err());
        assert!(validate_guest_path("/tmp/x").is_ok());
    }

    #[test]
    fn exec_event_json_is_stable() {
        let e = ExecEvent::Exit { code: Some(3), signal: None, timed_out: false };
        assert_eq!(serde_json::to_string(&e).unwrap(), r#"{"type":"exit","code":3,"signal":null,"timed_out":false}"#);
    }

    #[test]
    fn exec_request_validation() {
        assert!(ExecRequest::default().validate().is_err());
        let ok = ExecRequest { argv: vec!["true".into()], ..Default::default() };
        assert!(ok.validate().is_ok());
        let bad = ExecRequest { timeout_secs: Some(-1.0), ..ok.clone() };
        assert!(bad.validate().is_err());
        let bad = ExecRequest { cwd: Some("rel".into()), ..ok };
        assert!(bad.validate().is_err());
    }
}
