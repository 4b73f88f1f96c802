//! A sandbox's egress policy in parsed, validated form, and the always-blocked address ranges.
//! `verdict` mirrors the nftables rules `firewall` renders, so the daemon can decide which
//! established connections a policy change must cut.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

const MAX_DOMAINS: usize = 256;
const MAX_CIDRS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EgressMode {
    /// No outbound traffic at all; the resolver answers nothing.
    DenyAll,
    /// Only `allow_domains` (through the resolver) and `allow_cidrs`.
    Allowlist,
    /// Every public address; the always-blocked ranges stay blocked unless a CIDR allows them.
    Open,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PolicyError {
    #[error("invalid domain {0:?}: expected a name such as api.example.com or a wildcard such as *.example.com")]
    Domain(String),
    #[error("invalid CIDR {0:?}: expected an IPv4 address or network with an optional port or port range, such as 203.0.113.0/24, 10.0.0.5:5432 or 10.0.0.0/8:8000-8100")]
    Cidr(String),
    #[error("too many {what}: at most {max}")]
    TooMany { what: &'static str, max: usize },
    #[error("mode deny-all allows nothing, so it takes no allow_domains or allow_cidrs; use mode allowlist")]
    DenyAllWithRules,
}

/// `api.example.com` (exactly that name) or `*.example.com` (any name below example.com, not
/// example.com itself).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DomainPattern {
    wildcard: bool,
    name: String,
}

impl FromStr for DomainPattern {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let bad = || PolicyError::Domain(s.to_owned());
        let lower = s.trim().trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, lower),
        };
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(bad());
        }
        Ok(Self { wildcard, name })
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

impl DomainPattern {
    /// `qname` in lower case, without the trailing dot.
    pub fn matches(&self, qname: &str) -> bool {
        if self.wildcard {
            qname.len() > self.name.len() + 1
                && qname.ends_with(&self.name)
                && qname.as_bytes()[qname.len() - self.name.len() - 1] == b'.'
        } else {
            qname == self.name
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    pub const fn new(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Self {
        Self { addr: Ipv4Addr::new(a, b, c, d), prefix }
    }

    fn mask(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }

    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }
}

impl FromStr for Ipv4Net {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, p.parse::<u8>().map_err(|_| ())?),
            None => (s, 32),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| ())?;
        if prefix > 32 {
            return Err(());
        }
        let net = Self { addr, prefix };
        Ok(Self { addr: Ipv4Addr::from(u32::from(addr) & net.mask()), prefix })
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A network the sandbox may reach, on every port or on a port range (TCP and UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CidrRule {
    pub net: Ipv4Net,
    pub ports: Option<(u16, u16)>,
}

impl FromStr for CidrRule {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let bad = || PolicyError::Cidr(s.to_owned());
        let s = s.trim();
        let (net, ports) = match s.split_once(':') {
            Some((net, ports)) => {
                let (lo, hi) = ports.split_once('-').unwrap_or((ports, ports));
                let lo: u16 = lo.parse().map_err(|_| bad())?;
                let hi: u16 = hi.parse().map_err(|_| bad())?;
                if lo == 0 || hi < lo {
                    return Err(bad());
                }
                (net, Some((lo, hi)))
            }
            None => (s, None),
        };
        Ok(Self { net: net.parse().map_err(|_| bad())?, ports })
    }
}

impl fmt::Display for CidrRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.net)?;
        match self.ports {
            Some((lo, hi)) if lo == hi => write!(f, ":{lo}"),
            Some((lo, hi)) => write!(f, ":{lo}-{hi}"),
            None => Ok(()),
        }
    }
}

impl CidrRule {
    fn allows(&self, ip: Ipv4Addr, proto: Proto, port: Option<u16>) -> bool {
        if !self.net.contains(ip) {
            return false;
        }
        match (self.ports, proto, port) {
            (None, _, _) => true,
            (Some((lo, hi)), Proto::Tcp | Proto::Udp, Some(p)) => (lo..=hi).contains(&p),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    pub mode: EgressMode,
    pub domains: Vec<DomainPattern>,
    pub cidrs: Vec<CidrRule>,
}

impl Default for EgressPolicy {
    fn default() -> Self {
        Self { mode: EgressMode::DenyAll, domains: Vec::new(), cidrs: Vec::new() }
    }
}

/// Ports of DNS and DNS over TLS: the guest's only resolver is the host's, so these are closed
/// everywhere else unless a CIDR rule opens them.
pub const DNS_PORTS: [u16; 2] = [53, 853];

impl EgressPolicy {
    pub fn parse(mode: EgressMode, domains: &[String], cidrs: &[String]) -> Result<Self, PolicyError> {
        if domains.len() > MAX_DOMAINS {
            return Err(PolicyError::TooMany { what: "allow_domains", max: MAX_DOMAINS });
        }
        if cidrs.len() > MAX_CIDRS {
            return Err(PolicyError::TooMany { what: "allow_cidrs", max: MAX_CIDRS });
        }
        if mode == EgressMode::DenyAll && !(domains.is_empty() && cidrs.is_empty()) {
            return Err(PolicyError::DenyAllWithRules);
        }
        let mut policy = Self {
            mode,
            domains: domains.iter().map(|d| d.parse()).collect::<Result<_, _>>()?,
            cidrs: cidrs.iter().map(|c| c.parse()).collect::<Result<_, _>>()?,
        };
        let mut seen = std::collections::HashSet::new();
        policy.domains.retain(|d| seen.insert(d.to_string()));
        seen.clear();
        policy.cidrs.retain(|c| seen.insert(c.to_string()));
        Ok(policy)
    }

    /// Whether the resolver answers `qname` (lower case, no trailing dot).
    pub fn allows_name(&self, qname: &str) -> bool {
        match self.mode {
            EgressMode::DenyAll => false,
            EgressMode::Open => true,
            EgressMode::Allowlist => self.domains.iter().any(|d| d.matches(qname)),
        }
    }

    /// Whether a new connection from the guest to `ip` is let through. `resolved`: `ip` is in the
    /// sandbox's set of addresses answered for allowed names. Same order as the nftables chain.
    pub fn verdict(&self, ip: Ipv4Addr, proto: Proto, port: Option<u16>, resolved: bool, blocked: &Blocklist) -> bool {
        if self.cidrs.iter().any(|c| c.allows(ip, proto, port)) {
            return true;
        }
        if matches!(proto, Proto::Tcp | Proto::Udp) && port.is_some_and(|p| DNS_PORTS.contains(&p)) {
            return false;
        }
        if blocked.contains(ip) {
            return false;
        }
        match self.mode {
            EgressMode::DenyAll => false,
            EgressMode::Open => true,
            EgressMode::Allowlist => resolved,
        }
    }
}

/// Ranges no sandbox reaches unless a CIDR rule names them: private (RFC 1918, shared address
/// space), loopback, link-local (cloud metadata lives at 169.254.169.254), IETF protocol
/// assignments, Azure's platform address, multicast, reserved (240/4, with broadcast) and
/// "this network".
pub const ALWAYS_BLOCKED: [Ipv4Net; 11] = [
    Ipv4Net::new(0, 0, 0, 0, 8),
    Ipv4Net::new(10, 0, 0, 0, 8),
    Ipv4Net::new(100, 64, 0, 0, 10),
    Ipv4Net::new(127, 0, 0, 0, 8),
    Ipv4Net::new(169, 254, 0, 0, 16),
    Ipv4Net::new(168, 63, 129, 16, 32),
    Ipv4Net::new(172, 16, 0, 0, 12),
    Ipv4Net::new(192, 0, 0, 0, 24),
    Ipv4Net::new(192, 168, 0, 0, 16),
    Ipv4Net::new(224, 0, 0, 0, 4),
    Ipv4Net::new(240, 0, 0, 0, 4),
];

/// The always-blocked ranges plus this host's own addresses and the sandbox address pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocklist {
    pub nets: Vec<Ipv4Net>,
}

impl Blocklist {
    pub fn new(pool: Ipv4Net, host_addrs: impl IntoIterator<Item = Ipv4Addr>) -> Self {
        let mut nets: Vec<Ipv4Net> = ALWAYS_BLOCKED.to_vec();
        nets.push(pool);
        for ip in host_addrs {
            if !nets.iter().any(|n| n.contains(ip)) {
                nets.push(Ipv4Net { addr: ip, prefix: 32 });
            }
        }
        Self { nets }
    }

    /// Reads the host's current IPv4 addresses (all interfaces of the daemon's namespace).
    pub fn current(pool: Ipv4Net) -> Self {
        Self::new(pool, crate::host_ipv4_addresses().into_iter().map(|(_, ip)| ip))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.nets.iter().any(|n| n.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: EgressMode, domains: &[&str], cidrs: &[&str]) -> EgressPolicy {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        EgressPolicy::parse(mode, &s(domains), &s(cidrs)).unwrap()
    }

    #[test]
    fn domain_patterns() {
        let exact: DomainPattern = "Allowed.Test.".parse().unwrap();
        assert!(exact.matches("allowed.test"));
        assert!(!exact.matches("api.allowed.test"));
        let wild: DomainPattern = "*.allowed.test".parse().unwrap();
        assert!(wild.matches("api.allowed.test"));
        assert!(wild.matches("a.b.allowed.test"));
        assert!(!wild.matches("allowed.test"));
        assert!(!wild.matches("notallowed.test"));
        for bad in ["", "*.", "a..b", "-a.test", "a b.test", "*.*.test", "exa*mple.com", "http://x.test"] {
            assert!(bad.parse::<DomainPattern>().is_err(), "{bad}");
        }
        assert_eq!(wild.to_string(), "*.allowed.test");
    }

    #[test]
    fn cidr_rules() {
        let r: CidrRule = "10.1.2.3/24:8000-8100".parse().unwrap();
        assert_eq!(r.to_string(), "10.1.2.0/24:8000-8100");
        assert!(r.allows(Ipv4Addr::new(10, 1, 2, 9), Proto::Tcp, Some(8050)));
        assert!(!r.allows(Ipv4Addr::new(10, 1, 2, 9), Proto::Tcp, Some(80)));
        assert!(!r.allows(Ipv4Addr::new(10, 1, 2, 9), Proto::Other, None));
        assert_eq!("203.0.113.7".parse::<CidrRule>().unwrap().to_string(), "203.0.113.7/32");
        for bad in ["", "10.0.0.0/33", "10.0.0.0/8:0", "10.0.0.0/8:9-8", "x/8", "10.0.0.0/8:http", "::1/128"] {
            assert!(bad.parse::<CidrRule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn deny_all_takes_no_rules() {
        let e = EgressPolicy::parse(EgressMode::DenyAll, &["a.test".into()], &[]).unwrap_err();
        assert_eq!(e, PolicyError::DenyAllWithRules);
    }

    #[test]
    fn verdicts_follow_the_rule_order() {
        let blocked = Blocklist::new("10.240.0.0/16".parse().unwrap(), [Ipv4Addr::new(198, 51, 100, 1)]);
        let public = Ipv4Addr::new(198, 51, 100, 20);
        let metadata = Ipv4Addr::new(169, 254, 169, 254);
        let host = Ipv4Addr::new(198, 51, 100, 1);

        let allow = policy(EgressMode::Allowlist, &["allowed.test"], &["10.9.0.0/16:5432"]);
        assert!(allow.verdict(public, Proto::Tcp, Some(80), true, &blocked));
        assert!(!allow.verdict(public, Proto::Tcp, Some(80), false, &blocked));
        assert!(!allow.verdict(public, Proto::Udp, Some(53), true, &blocked), "DNS elsewhere");
        assert!(allow.verdict(Ipv4Addr::new(10, 9, 1, 1), Proto::Tcp, Some(5432), false, &blocked));
        assert!(!allow.verdict(Ipv4Addr::new(10, 9, 1, 1), Proto::Tcp, Some(22), false, &blocked));

        let open = policy(EgressMode::Open, &[], &[]);
        assert!(open.verdict(public, Proto::Other, None, false, &blocked));
        assert!(!open.verdict(metadata, Proto::Tcp, Some(80), false, &blocked));
        assert!(!open.verdict(host, Proto::Tcp, Some(22), false, &blocked));
        assert!(!open.verdict(Ipv4Addr::new(10, 240, 0, 6), Proto::Tcp, Some(50051), false, &blocked));

        let none = EgressPolicy::default();
        assert!(!none.verdict(public, Proto::Tcp, Some(80), true, &blocked));
        assert!(!none.allows_name("allowed.test"));
        assert!(open.allows_name("anything.example"));
    }
}
