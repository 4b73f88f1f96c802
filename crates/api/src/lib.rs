//! The public shapes of Torpor's REST API. They serialise to the stable JSON documented in the
//! README and the OpenAPI document: add fields, never rename or remove them.
//!
//! This crate knows nothing of the daemon (no HTTP server, storage or configuration), so the
//! client, the CLI and outside programs use it without compiling the control plane. Checks that
//! need only the request itself live here; checks against the daemon's configuration (ranges,
//! configured secrets and upstreams) live in the daemon.

mod channel;
mod error;
mod exec;
mod grants;
mod health;
mod network;
mod sandbox;
mod template;

pub use channel::{
    AgentConversation, AgentStatus, Channel, ChannelKind, ChannelList, ChannelMessage, CreateChannel, RelayEvent,
    SlackSecrets, TelegramSecrets, DEFAULT_MAX_CONVERSATIONS, MAX_CONVERSATIONS,
};
pub use error::{ErrorBody, ErrorDetail, Invalid};
pub use exec::{validate_env_name, validate_guest_path, ExecClientMessage, ExecEvent, ExecRequest, SignalRequest};
pub use grants::{AgentConfig, GitHubGrant, ModelFlavour, ModelGrant, AGENT_ADAPTERS, MAX_GITHUB_REPOSITORIES};
pub use health::Health;
pub use network::{NetworkMode, NetworkPolicy, NetworkStatus, ResolvedAddress, REGISTRIES};
pub use sandbox::{
    is_valid_sandbox_id, new_sandbox_id, CreateSandbox, GuestInfo, Limits, NetworkInfo, Sandbox, SandboxList, State,
    Usage, ID_PREFIX, MAX_IDLE_TIMEOUT_SECS,
};
pub use template::{validate_template_name, CreateTemplate, Template, TemplateList, BASE_TEMPLATE};
