//! What the host's own namespace needs for sandboxes to reach the outside: forwarding on, and
//! their traffic masqueraded behind the host's address. The policy itself is enforced in each
//! sandbox's namespace; these rules add defence in depth (no sandbox reaches the host's own
//! services or another sandbox through the host). One table per address pool, so daemons with
//! different pools (tests run several) never touch each other's rules.

use crate::policy::Ipv4Net;
use crate::NetError;

pub struct HostRouting {
    pool: Ipv4Net,
    table: String,
}

impl HostRouting {
    pub fn new(pool: Ipv4Net) -> Self {
        let table = format!("torpor_{}_{}", pool.addr.to_string().replace('.', "_"), pool.prefix);
        Self { pool, table }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Idempotent: the table is replaced as a whole in one transaction.
    pub async fn install(&self) -> Result<(), NetError> {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|source| NetError::Spawn { command: "enabling net.ipv4.ip_forward".into(), source })?;
        let (table, pool) = (&self.table, self.pool);
        let rules = format!(
            r#"table ip {table} {{}}
delete table ip {table}
table ip {table} {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {pool} oifname != "tv*" masquerade
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname "tv*" ip saddr {pool} oifname "tv*" drop
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "tv*" ip saddr {pool} ct state established,related accept
    iifname "tv*" ip saddr {pool} drop
  }}
}}
"#
        );
        let mut cmd = tokio::process::Command::new("nft");
        cmd.args(["-f", "-"]);
        crate::cmd::run(cmd, format!("nft -f - (host table {table})"), Some(rules)).await.map(drop)
    }
}
