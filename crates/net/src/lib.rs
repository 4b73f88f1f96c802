//! Each sandbox gets its own network namespace holding the guest's tap device and one end of a
//! veth pair; the other end sits on the host with a unique /30. The host reaches the guest's
//! supervisor at the namespace's veth address, which nftables inside the namespace forwards (DNAT)
//! to the fixed guest address. Everything else is dropped: a sandbox has no outbound network until
//! an egress policy grants it, and cannot reach the host or another sandbox.
//!
//! Every rule of a sandbox lives in its own namespace (`firewall`, `egress`), so deleting the
//! namespace removes all of it at once. The host's own tables get only one table per address
//! pool (`host`): forwarding out, and nothing from a sandbox to the host or another sandbox.

mod addr;
mod cmd;
mod egress;
mod firewall;
mod host;
mod policy;
mod resolved;

pub use addr::{AddressPool, PoolError};
pub use cmd::with_netns;
pub use egress::{PolicyChange, ResolvedAddress, SandboxEgress, Upstream};
pub use firewall::{DNS_TCP_CONNECTIONS, EGRESS_FLOWS, EGRESS_FLOWS_PER_SEC, GUEST_API_CONNECTIONS};
pub use host::HostRouting;
pub use policy::{Blocklist, CidrRule, DomainPattern, EgressMode, EgressPolicy, Ipv4Net, PolicyError};

use std::net::Ipv4Addr;

use cmd::{in_ns, ip, ip_in_ns};
use torpor_proto::{GATEWAY_MAC, GUEST_GATEWAY, GUEST_IP, GUEST_MAC, GUEST_PREFIX_LEN, SUPERVISOR_PORT};

/// Name of the tap device inside every sandbox namespace.
pub const TAP: &str = "tap0";
const NS_VETH: &str = "veth0";
/// Prefix of every namespace Torpor creates.
pub const NETNS_PREFIX: &str = "torpor-";

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{command} failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Pool(#[from] PoolError),
    #[error("sandbox resolver: {0}")]
    Dns(String),
    #[error("host address {addr} is already on interface {interface} (a leftover of another daemon sharing this address pool?); remove it or give this daemon its own address_pool")]
    AddressInUse { addr: Ipv4Addr, interface: String },
}

/// Everything that names one sandbox's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxNet {
    pub netns: String,
    pub host_veth: String,
    pub host_ip: Ipv4Addr,
    /// The address the host uses to reach the guest supervisor (NATed to the guest).
    pub guest_access_ip: Ipv4Addr,
}

impl SandboxNet {
    /// `id_suffix` must be unique among live sandboxes and at most 13 characters, so the veth name
    /// fits the kernel's 15-character limit.
    pub fn new(id_suffix: &str, host_ip: Ipv4Addr, guest_access_ip: Ipv4Addr) -> Self {
        Self {
            netns: format!("{NETNS_PREFIX}{id_suffix}"),
            host_veth: format!("tv{}", &id_suffix[..id_suffix.len().min(13)]),
            host_ip,
            guest_access_ip,
        }
    }

    pub fn supervisor_addr(&self) -> std::net::SocketAddr {
        (self.guest_access_ip, SUPERVISOR_PORT).into()
    }

    /// Creates the namespace, links and rules (with no egress: a policy is applied after). On
    /// failure everything created is removed again.
    /// `tap_owner`: the uid (and gid) the VM process runs as, which may then attach to the tap
    /// without any capability.
    pub async fn setup(&self, tap_owner: Option<u32>) -> Result<(), NetError> {
        let result = self.try_setup(tap_owner).await;
        if result.is_err() {
            let _ = self.teardown().await;
        }
        result
    }

    async fn try_setup(&self, tap_owner: Option<u32>) -> Result<(), NetError> {
        if let Some(owner) = address_owner(self.host_ip) {
            return Err(NetError::AddressInUse { addr: self.host_ip, interface: owner });
        }
        let ns = self.netns.as_str();
        ip(&["netns", "add", ns]).await?;
        ip(&["link", "add", &self.host_veth, "type", "veth", "peer", "name", NS_VETH, "netns", ns]).await?;
        ip(&["addr", "add", &format!("{}/30", self.host_ip), "dev", &self.host_veth]).await?;
        ip(&["link", "set", &self.host_veth, "up"]).await?;
        ip_in_ns(ns, &["link", "set", "lo", "up"]).await?;
        ip_in_ns(ns, &["addr", "add", &format!("{}/30", self.guest_access_ip), "dev", NS_VETH]).await?;
        ip_in_ns(ns, &["link", "set", NS_VETH, "up"]).await?;
        match tap_owner {
            Some(id) => {
                let id = id.to_string();
                ip_in_ns(ns, &["tuntap", "add", "dev", TAP, "mode", "tap", "user", &id, "group", &id]).await?
            }
            None => ip_in_ns(ns, &["tuntap", "add", "dev", TAP, "mode", "tap"]).await?,
        }
        ip_in_ns(ns, &["link", "set", TAP, "address", GATEWAY_MAC]).await?;
        ip_in_ns(ns, &["addr", "add", &format!("{GUEST_GATEWAY}/{GUEST_PREFIX_LEN}"), "dev", TAP]).await?;
        ip_in_ns(ns, &["link", "set", TAP, "up"]).await?;
        self.set_guest_mac(GUEST_MAC).await?;
        ip_in_ns(ns, &["route", "add", "default", "via", &self.host_ip.to_string()]).await?;
        in_ns(ns, "sysctl", &["-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.disable_ipv6=1"], None).await?;
        in_ns(ns, "nft", &["-f", "-"], Some(firewall::base_ruleset(self))).await?;
        Ok(())
    }

    /// Removes the veth pair, then the namespace (and with it the tap and every rule). Idempotent.
    pub async fn teardown(&self) -> Result<(), NetError> {
        // The host end first, explicitly: deleting a namespace destroys its devices later, in a
        // kernel work queue, and until then the old veth's route would shadow a new sandbox's on
        // the same address slot.
        if link_exists(&self.host_veth) {
            if let Err(e) = ip(&["link", "del", &self.host_veth]).await {
                if link_exists(&self.host_veth) {
                    return Err(e);
                }
            }
        }
        if netns_exists(&self.netns) {
            // Someone else (a concurrent teardown) may win the race; gone is gone.
            if let Err(e) = ip(&["netns", "del", &self.netns]).await {
                if netns_exists(&self.netns) {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Tells the namespace the guest's MAC up front. Without it the first packet to a guest that
    /// is not running yet (booting, or being restored) waits on an unanswered ARP request, whose
    /// retry comes a full second later. `stale`: used at once, still verified and re-learned if
    /// the guest changes its address.
    pub async fn set_guest_mac(&self, mac: &str) -> Result<(), NetError> {
        ip_in_ns(&self.netns, &["neigh", "replace", GUEST_IP, "lladdr", mac, "dev", TAP, "nud", "stale"]).await
    }

    pub fn exists(&self) -> bool {
        netns_exists(&self.netns) && link_exists(&self.host_veth)
    }
}

/// The host interface that already carries `addr`, if any.
fn address_owner(addr: Ipv4Addr) -> Option<String> {
    host_ipv4_addresses().into_iter().find(|(_, a)| *a == addr).map(|(interface, _)| interface)
}

/// Every IPv4 address of the daemon's namespace, with its interface.
pub(crate) fn host_ipv4_addresses() -> Vec<(String, Ipv4Addr)> {
    let Ok(out) = std::process::Command::new("ip").args(["-o", "-4", "addr", "show"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // "2: eth0    inet 192.0.2.2/24 brd …"
            let mut words = l.split_whitespace();
            let interface = words.nth(1)?.to_owned();
            words.find(|w| *w == "inet")?;
            Some((interface, words.next()?.split('/').next()?.parse().ok()?))
        })
        .collect()
}

pub fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

pub fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Path of a namespace handle, for a process that must enter it (`setns`).
pub fn netns_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new("/run/netns").join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_kernel_limits() {
        let net = SandboxNet::new("sb-abcdefghijkl", Ipv4Addr::new(10, 240, 0, 5), Ipv4Addr::new(10, 240, 0, 6));
        assert!(net.host_veth.len() <= 15, "{}", net.host_veth);
        assert_eq!(net.netns, "torpor-sb-abcdefghijkl");
    }
}
