//! The nftables rules of one sandbox namespace, and the connection-tracking cut that makes a
//! policy change apply to connections already open.
//!
//! Egress is decided on the namespace's forward hook, between the guest's tap and the veth to
//! the host: in the host kernel, out of the guest's reach. Only the first packet of a connection
//! is judged (`ct state new`); a policy change deletes the tracking entries of connections the
//! new policy denies, so their next packet is judged again and rejected.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use torpor_proto::{GUEST_API_PORT, GUEST_GATEWAY, GUEST_IP, SUPERVISOR_PORT};

use crate::cmd::in_ns;
use crate::policy::{Blocklist, EgressMode, EgressPolicy, Proto, DNS_PORTS};
use crate::{NetError, SandboxNet, NS_VETH, TAP};

const TABLE: &str = "inet torpor_filter";
/// Most addresses one sandbox may have resolved at once; a full set makes the resolver answer
/// SERVFAIL rather than let the daemon's memory grow without bound.
pub(crate) const RESOLVED_SET_SIZE: usize = 16384;
/// Connections a guest may hold open to its API endpoint, and to its resolver over TCP: each
/// is a descriptor in the daemon. Further ones are reset by the kernel before the daemon
/// accepts anything.
pub const GUEST_API_CONNECTIONS: usize = 64;
pub const DNS_TCP_CONNECTIONS: usize = 16;
/// Connections a guest may have open through its egress at once (each is tracked in the
/// sandbox's namespace and, masqueraded, in the host's, whose table all sandboxes share), and
/// how many it may open per second (closed ones linger in the host's table for minutes).
pub const EGRESS_FLOWS: usize = 1024;
pub const EGRESS_FLOWS_PER_SEC: u32 = 50;
const EGRESS_FLOWS_BURST: u32 = 500;

/// The namespace's whole firewall, with an empty egress chain (nothing leaves) until a policy is
/// applied; applying one fills the blocked set in the same transaction. The host reaches the
/// guest on the supervisor port only; the guest reaches the namespace on the resolver and API
/// ports only.
pub(crate) fn base_ruleset(net: &SandboxNet) -> String {
    format!(
        r#"flush ruleset
table ip torpor_nat {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "{NS_VETH}" ip daddr {access} tcp dport {SUPERVISOR_PORT} dnat to {GUEST_IP}:{SUPERVISOR_PORT}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{TAP}" masquerade
    oifname "{NS_VETH}" masquerade
  }}
}}
table {TABLE} {{
  set blocked {{ type ipv4_addr; flags interval; auto-merge; }}
  set resolved {{ type ipv4_addr; flags timeout; size {RESOLVED_SET_SIZE}; }}
  chain deny {{
    meta l4proto tcp reject with tcp reset
    reject with icmpx type admin-prohibited
  }}
  chain egress {{
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    meta nfproto ipv6 drop
    iifname "{TAP}" ip saddr != {GUEST_IP} drop
    ct state established,related accept
    iifname "{NS_VETH}" oifname "{TAP}" ip daddr {GUEST_IP} tcp dport {SUPERVISOR_PORT} ct state new accept
    iifname "{TAP}" oifname "{NS_VETH}" ct state new ct count over {EGRESS_FLOWS} goto deny
    iifname "{TAP}" oifname "{NS_VETH}" ct state new limit rate over {EGRESS_FLOWS_PER_SEC}/second burst {EGRESS_FLOWS_BURST} packets goto deny
    iifname "{TAP}" oifname "{NS_VETH}" ct state new jump egress
    iifname "{TAP}" goto deny
  }}
  chain input {{
    type filter hook input priority filter; policy drop;
    meta nfproto ipv6 drop
    iifname "{TAP}" ip saddr != {GUEST_IP} drop
    ct state established,related accept
    iifname "lo" accept
    iifname "{TAP}" tcp dport 53 ct state new ct count over {DNS_TCP_CONNECTIONS} reject with tcp reset
    iifname "{TAP}" tcp dport {GUEST_API_PORT} ct state new ct count over {GUEST_API_CONNECTIONS} reject with tcp reset
    iifname "{TAP}" ip saddr {GUEST_IP} ip daddr {GUEST_GATEWAY} meta l4proto {{ tcp, udp }} th dport 53 accept
    iifname "{TAP}" ip saddr {GUEST_IP} ip daddr {GUEST_GATEWAY} tcp dport {GUEST_API_PORT} accept
    iifname "{TAP}" goto deny
    iifname "{NS_VETH}" meta l4proto tcp reject with tcp reset
  }}
}}
"#,
        access = net.guest_access_ip,
    )
}

/// Rules of the egress chain, in the order `EgressPolicy::verdict` mirrors.
fn egress_rules(policy: &EgressPolicy) -> Vec<String> {
    let mut rules = Vec::new();
    for cidr in &policy.cidrs {
        rules.push(match cidr.ports {
            None => format!("ip daddr {} accept", cidr.net),
            // A one-port range `80-80` is refused by nft releases before 1.0.3.
            Some((lo, hi)) if lo == hi => {
                format!("ip daddr {} meta l4proto {{ tcp, udp }} th dport {lo} accept", cidr.net)
            }
            Some((lo, hi)) => format!("ip daddr {} meta l4proto {{ tcp, udp }} th dport {lo}-{hi} accept", cidr.net),
        });
    }
    let dns: Vec<String> = DNS_PORTS.iter().map(u16::to_string).collect();
    rules.push(format!("meta l4proto {{ tcp, udp }} th dport {{ {} }} goto deny", dns.join(", ")));
    rules.push("ip daddr @blocked goto deny".to_owned());
    match policy.mode {
        EgressMode::DenyAll => {}
        EgressMode::Allowlist => rules.push("ip daddr @resolved accept".to_owned()),
        EgressMode::Open => rules.push("meta nfproto ipv4 accept".to_owned()),
    }
    rules
}

/// One nftables transaction: the egress chain for `policy`, the blocked set refreshed, and, when
/// `resolved` is given, the resolved set replaced by exactly those addresses.
fn policy_batch(policy: &EgressPolicy, blocked: &Blocklist, resolved: Option<&[(Ipv4Addr, Duration)]>) -> String {
    let mut batch = format!("flush chain {TABLE} egress\n");
    for rule in egress_rules(policy) {
        let _ = writeln!(batch, "add rule {TABLE} egress {rule}");
    }
    let _ = writeln!(batch, "flush set {TABLE} blocked");
    if !blocked.nets.is_empty() {
        let list: Vec<String> = blocked.nets.iter().map(|n| n.to_string()).collect();
        let _ = writeln!(batch, "add element {TABLE} blocked {{ {} }}", list.join(", "));
    }
    if let Some(resolved) = resolved {
        let _ = writeln!(batch, "flush set {TABLE} resolved");
        if !resolved.is_empty() {
            let _ = writeln!(batch, "add element {TABLE} resolved {{ {} }}", timed_elements(resolved));
        }
    }
    batch
}

fn timed_elements(addrs: &[(Ipv4Addr, Duration)]) -> String {
    let list: Vec<String> = addrs.iter().map(|(ip, t)| format!("{ip} timeout {}s", t.as_secs().max(1))).collect();
    list.join(", ")
}

pub(crate) async fn apply_policy(
    netns: &str,
    policy: &EgressPolicy,
    blocked: &Blocklist,
    resolved: Option<&[(Ipv4Addr, Duration)]>,
) -> Result<(), NetError> {
    in_ns(netns, "nft", &["-f", "-"], Some(policy_batch(policy, blocked, resolved))).await.map(drop)
}

/// Lets the guest reach `fresh` (not in the set yet) and `refresh` (in it, with a timeout that
/// is too short) for the given times. A plain `add` of an element already present keeps its old
/// timeout, so refreshed ones are deleted and added again in the same transaction. That costs
/// ~15 ms here against ~3 ms for a plain add (the kernel waits for a grace period before freeing
/// the old element), hence the split.
pub(crate) async fn add_resolved(
    netns: &str,
    fresh: &[(Ipv4Addr, Duration)],
    refresh: &[(Ipv4Addr, Duration)],
) -> Result<(), NetError> {
    let mut batch = String::new();
    if !fresh.is_empty() {
        let _ = writeln!(batch, "add element {TABLE} resolved {{ {} }}", timed_elements(fresh));
    }
    if !refresh.is_empty() {
        let plain: Vec<String> = refresh.iter().map(|(ip, _)| ip.to_string()).collect();
        let plain = plain.join(", ");
        let _ = writeln!(batch, "add element {TABLE} resolved {{ {plain} }}");
        let _ = writeln!(batch, "delete element {TABLE} resolved {{ {plain} }}");
        let _ = writeln!(batch, "add element {TABLE} resolved {{ {} }}", timed_elements(refresh));
    }
    if batch.is_empty() {
        return Ok(());
    }
    in_ns(netns, "nft", &["-f", "-"], Some(batch)).await.map(drop)
}

/// The resolved set as the kernel has it: (address, time left). After a daemon restart this is
/// all that is known of what the old resolver answered.
pub(crate) async fn list_resolved(netns: &str) -> Result<Vec<(Ipv4Addr, Duration)>, NetError> {
    let out = in_ns(netns, "nft", &["-j", "list", "set", "inet", "torpor_filter", "resolved"], None).await?;
    Ok(parse_set_json(&out))
}

fn parse_set_json(json: &str) -> Vec<(Ipv4Addr, Duration)> {
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(json) else { return Vec::new() };
    let items = doc["nftables"].as_array().into_iter().flatten();
    items
        .filter_map(|item| item["set"]["elem"].as_array())
        .flatten()
        .filter_map(|e| {
            let ip = e["elem"]["val"].as_str()?.parse().ok()?;
            Some((ip, Duration::from_secs(e["elem"]["expires"].as_u64()?)))
        })
        .collect()
}

/// A connection the guest opened, as conntrack lists it.
#[derive(Debug, PartialEq)]
struct Tracked {
    proto_name: String,
    proto: Proto,
    dst: Ipv4Addr,
    dport: Option<u16>,
}

fn parse_conntrack(listing: &str) -> Vec<Tracked> {
    listing
        .lines()
        .filter_map(|line| {
            let proto_name = line.split_whitespace().next()?.to_owned();
            let field = |key: &str| line.split_whitespace().find_map(|w| w.strip_prefix(key));
            let dst: Ipv4Addr = field("dst=")?.parse().ok()?;
            let proto = match proto_name.as_str() {
                "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                _ => Proto::Other,
            };
            let dport = field("dport=").and_then(|p| p.parse().ok());
            Some(Tracked { proto_name, proto, dst, dport })
        })
        .collect()
}

/// Deletes the tracking of every guest connection `policy` no longer allows; returns how many.
/// Their next packet is then judged as new and rejected (TCP reset, ICMP unreachable), and
/// replies from the far end are answered with a reset on the namespace's input hook.
pub(crate) async fn cut_denied(
    netns: &str,
    policy: &EgressPolicy,
    blocked: &Blocklist,
    resolved: &HashSet<Ipv4Addr>,
) -> Result<usize, NetError> {
    let listing = in_ns(netns, "conntrack", &["-L", "-s", GUEST_IP], None).await?;
    let gateway: Ipv4Addr = GUEST_GATEWAY.parse().expect("constant address");
    let mut cut = 0;
    let mut seen = HashSet::new();
    for conn in parse_conntrack(&listing) {
        // One deletion covers every flow to the same (protocol, address, port).
        if !seen.insert((conn.proto_name.clone(), conn.dst, conn.dport)) {
            continue;
        }
        if conn.dst == gateway
            || policy.verdict(conn.dst, conn.proto, conn.dport, resolved.contains(&conn.dst), blocked)
        {
            continue;
        }
        let dst = conn.dst.to_string();
        let port = conn.dport.map(|p| p.to_string());
        let mut args = vec!["-D", "-s", GUEST_IP, "-d", &dst, "-p", &conn.proto_name];
        if let Some(port) = &port {
            args.extend(["--dport", port]);
        }
        // "0 flow entries deleted" exits non-zero: the connection ended by itself meanwhile.
        if in_ns(netns, "conntrack", &args, None).await.is_ok() {
            cut += 1;
        }
    }
    Ok(cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_chain_order() {
        let policy = EgressPolicy::parse(
            EgressMode::Allowlist,
            &["allowed.test".into()],
            &["203.0.113.0/24".into(), "10.0.0.5:5432".into()],
        )
        .unwrap();
        let rules = egress_rules(&policy);
        assert_eq!(rules[0], "ip daddr 203.0.113.0/24 accept");
        assert_eq!(rules[1], "ip daddr 10.0.0.5/32 meta l4proto { tcp, udp } th dport 5432 accept");
        assert!(rules[2].contains("{ 53, 853 } goto deny"));
        assert_eq!(rules[3], "ip daddr @blocked goto deny");
        assert_eq!(rules.last().unwrap(), "ip daddr @resolved accept");
        assert_eq!(egress_rules(&EgressPolicy::default()).len(), 2, "deny-all adds no accept");
    }

    #[test]
    fn parses_the_resolved_set() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"set": {"family": "inet", "name": "resolved",
            "elem": [{"elem": {"val": "1.2.3.4", "timeout": 30, "expires": 29}}, {"elem": {"val": "1.2.3.5", "timeout": 3600, "expires": 3599}}]}}]}"#;
        assert_eq!(
            parse_set_json(json),
            vec![
                (Ipv4Addr::new(1, 2, 3, 4), Duration::from_secs(29)),
                (Ipv4Addr::new(1, 2, 3, 5), Duration::from_secs(3599))
            ]
        );
        assert!(parse_set_json(r#"{"nftables": [{"set": {"name": "resolved"}}]}"#).is_empty());
    }

    #[test]
    fn parses_conntrack_listing() {
        let listing = "tcp      6 431995 ESTABLISHED src=192.168.240.2 dst=198.18.1.10 sport=40000 dport=7 src=198.18.1.10 dst=10.200.0.6 sport=7 dport=40000 [ASSURED] mark=0 use=1\n\
                       icmp     1 29 src=192.168.240.2 dst=198.18.1.12 type=8 code=0 id=4 src=198.18.1.12 dst=10.200.0.6 type=0 code=0 id=4 mark=0 use=1\n";
        let conns = parse_conntrack(listing);
        assert_eq!(conns.len(), 2);
        assert_eq!(conns[0].dst, Ipv4Addr::new(198, 18, 1, 10));
        assert_eq!(conns[0].dport, Some(7));
        assert_eq!(conns[1].proto, Proto::Other);
        assert_eq!(conns[1].dport, None);
    }
}
