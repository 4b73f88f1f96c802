//! The gRPC contract between the host and the guest supervisor, and the constants both sides share.

pub mod supervisor {
    tonic::include_proto!("torpor.supervisor.v1");
}

/// TCP port the guest supervisor listens on inside every sandbox.
pub const SUPERVISOR_PORT: u16 = 50051;

/// Metadata key carrying `Bearer <secret>` on every call.
pub const AUTH_HEADER: &str = "authorization";

/// Name of the QEMU fw_cfg entry that carries the per-sandbox secret into the guest. fw_cfg keeps the
/// secret out of the kernel command line, which every host user could read from `ps`.
pub const SECRET_FW_CFG_NAME: &str = "opt/torpor/secret";

/// Fixed guest network: every sandbox sees the same addresses, so clones of one snapshot all work.
pub const GUEST_IP: &str = "192.168.240.2";
pub const GUEST_GATEWAY: &str = "192.168.240.1";
pub const GUEST_PREFIX_LEN: u8 = 24;

/// Version the supervisor reports in `Health`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
