//! Sandboxes: their record, the create request and what a bill is computed from.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{AgentConfig, GitHubGrant, ModelGrant, NetworkPolicy};

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    ToSchema,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantArray,
)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
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
        self.into()
    }

    pub fn parse(s: &str) -> Option<State> {
        s.parse().ok()
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

/// Longest idle timeout accepted: 30 days (0 means never, for longer).
pub const MAX_IDLE_TIMEOUT_SECS: u64 = 30 * 24 * 3600;

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

#[cfg(test)]
mod tests {
    use strum::VariantArray;

    use super::*;

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
    fn states_read_back_as_written_and_as_serde_writes_them() {
        for state in State::VARIANTS {
            assert_eq!(State::parse(state.as_str()), Some(*state));
            assert_eq!(serde_json::to_string(state).unwrap(), format!("\"{}\"", state.as_str()));
        }
        assert_eq!(State::parse("Running"), None);
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<Sandbox>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GuestInfo {
    pub uptime_secs: f64,
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    pub disk_total_bytes: u64,
    pub disk_free_bytes: u64,
    pub kernel: String,
    pub hostname: String,
}
