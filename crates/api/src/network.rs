//! Egress policies as the API states them. Parsing them into what the firewall enforces is the
//! daemon's (torpor-net); see docs/network.md.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

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
