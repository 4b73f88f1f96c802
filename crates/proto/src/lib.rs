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
/// Port of the Torpor API as the guest reaches it, on the gateway address (served by the daemon
/// inside the sandbox namespace; device tokens only).
pub const GUEST_API_PORT: u16 = 7070;
pub const GUEST_PREFIX_LEN: u8 = 24;
/// Every guest's MAC at boot, like its IP: each sits alone on its own link. Clones of a template
/// take a random one of their own.
pub const GUEST_MAC: &str = "02:74:70:00:00:02";
/// The MAC of the host end of every guest's link. Fixed for the same reason: a clone restored from
/// a template remembers the gateway's MAC from the template's neighbour cache, and a different
/// one would leave its answers unaddressed until that cache entry expired (about a second).
pub const GATEWAY_MAC: &str = "02:74:70:00:00:01";

/// Version the supervisor reports in `Health`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
