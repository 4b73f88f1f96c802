use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `GET /v1/health`: the daemon is up; needs no API key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
    /// `kvm` or `tcg`; null when QEMU is missing.
    pub accelerator: Option<String>,
}
