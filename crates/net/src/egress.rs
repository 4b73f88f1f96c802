//! One sandbox's egress: its policy, applied to the namespace firewall, and the DNS resolver that
//! is the guest's only name server.
//!
//! The resolver listens on the guest's gateway address *inside* the sandbox namespace (its
//! sockets are created there), so which sandbox asks is known from the socket, never from a
//! packet the guest could forge. It answers names the policy allows, resolving them upstream,
//! and adds every IPv4 address it answers to the sandbox's `resolved` set for the record's TTL
//! *before* the answer leaves, so the connection that follows finds its address allowed.

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Metadata, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo, Server};
use hickory_server::zone_handler::MessageResponseBuilder;
use torpor_proto::GUEST_GATEWAY;

use crate::cmd::with_netns;
use crate::firewall;
use crate::policy::{Blocklist, EgressMode, EgressPolicy, Ipv4Net};
use crate::resolved::Resolved;
use crate::NetError;

/// Added to every record's TTL: the guest connects a moment after the answer arrives, and a TTL
/// of 0 or 1 s would otherwise expire before its first SYN.
const TTL_GRACE: Duration = Duration::from_secs(5);
/// Addresses remembered per sandbox, as many as its nftables set holds; past that, the ones
/// expiring soonest are forgotten first (they stay in the set until their own timeout).
const MAX_REMEMBERED: usize = firewall::RESOLVED_SET_SIZE;
const TCP_IDLE: Duration = Duration::from_secs(10);

/// The resolvers the host's sandbox resolvers forward to, shared by every sandbox (and so is
/// its cache).
pub struct Upstream {
    resolver: TokioResolver,
}

impl Upstream {
    /// `servers` empty: the host's own resolvers, from /etc/resolv.conf.
    pub fn new(servers: &[IpAddr]) -> Result<Self, NetError> {
        let builder = if servers.is_empty() {
            match TokioResolver::builder_tokio() {
                Ok(builder) => builder,
                Err(e) => {
                    // Sandboxes still start; their allowed names fail (SERVFAIL) until fixed.
                    tracing::warn!(
                        "no upstream name servers: reading /etc/resolv.conf failed ({e}); set dns_upstreams in the config"
                    );
                    TokioResolver::builder_with_config(ResolverConfig::default(), TokioRuntimeProvider::default())
                }
            }
        } else {
            let mut config = ResolverConfig::default();
            config.name_servers = servers.iter().map(|ip| NameServerConfig::udp_and_tcp(*ip)).collect();
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        };
        let mut builder = builder;
        // The guest's name and nothing else goes upstream: names are looked up fully qualified,
        // so no search domain is appended (x.allowed.test must never become
        // x.allowed.test.corp.internal), and /etc/hosts is not consulted.
        builder.options_mut().ndots = 0;
        builder.options_mut().use_hosts_file = ResolveHosts::Never;
        let resolver = builder.build().map_err(|e| NetError::Dns(format!("setting up the upstream resolver: {e}")))?;
        Ok(Self { resolver })
    }
}

/// An address the resolver handed to the guest, and for which names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedAddress {
    pub addr: Ipv4Addr,
    pub names: BTreeSet<String>,
    pub expires_in: Duration,
}

struct State {
    policy: EgressPolicy,
    resolved: Resolved,
}

struct Inner {
    netns: String,
    pool: Ipv4Net,
    upstream: Arc<Upstream>,
    /// Held across firewall updates, so an answer and a policy change never interleave.
    state: tokio::sync::Mutex<State>,
}

/// What changed when a policy was replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyChange {
    /// Open connections the new policy denies, now cut.
    pub connections_cut: usize,
}

pub struct SandboxEgress {
    inner: Arc<Inner>,
    server: Mutex<Option<Server<Handler>>>,
}

impl SandboxEgress {
    /// Applies `policy` to the namespace's firewall and starts the resolver in it. Addresses
    /// already in the resolved set (a daemon restart) keep their timeouts.
    pub async fn start(
        netns: &str,
        pool: Ipv4Net,
        policy: EgressPolicy,
        upstream: Arc<Upstream>,
    ) -> Result<Self, NetError> {
        firewall::apply_policy(netns, &policy, &Blocklist::current(pool), None).await?;
        // After a daemon restart the set still holds what the old resolver answered (for which
        // names is lost: a policy change drops those addresses).
        let now = Instant::now();
        let mut resolved = Resolved::new(MAX_REMEMBERED, now);
        resolved.restore(firewall::list_resolved(netns).await?, now);
        let inner = Arc::new(Inner {
            netns: netns.to_owned(),
            pool,
            upstream,
            state: tokio::sync::Mutex::new(State { policy, resolved }),
        });
        let listen: SocketAddr = (GUEST_GATEWAY.parse::<Ipv4Addr>().expect("constant address"), 53).into();
        let (udp, tcp) = with_netns(netns, move || {
            let udp = std::net::UdpSocket::bind(listen)?;
            udp.set_nonblocking(true)?;
            let tcp = std::net::TcpListener::bind(listen)?;
            tcp.set_nonblocking(true)?;
            Ok((udp, tcp))
        })
        .map_err(|e| NetError::Dns(format!("binding the resolver to {listen} in {netns}: {e}")))?;
        let udp = tokio::net::UdpSocket::from_std(udp).map_err(|e| NetError::Dns(e.to_string()))?;
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(|e| NetError::Dns(e.to_string()))?;
        let mut server = Server::new(Handler(inner.clone()));
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE, 16);
        Ok(Self { inner, server: Mutex::new(Some(server)) })
    }

    /// Replaces the policy: the firewall, the resolved set (addresses of names the new policy
    /// still allows stay, all others go) and open connections the new policy denies.
    pub async fn set_policy(&self, policy: EgressPolicy) -> Result<PolicyChange, NetError> {
        let inner = &self.inner;
        let mut state = inner.state.lock().await;
        let now = Instant::now();
        let keep: Vec<(Ipv4Addr, Duration)> = state
            .resolved
            .live(now)
            .filter(|(_, e)| e.names.iter().any(|n| policy.allows_name(n)))
            .map(|(ip, e)| (*ip, e.expires - now))
            .collect();
        let blocked = Blocklist::current(inner.pool);
        if let Err(e) = firewall::apply_policy(&inner.netns, &policy, &blocked, Some(&keep)).await {
            // Neither the old policy (the caller asked for another) nor the new one (it did not
            // load): fail closed until a policy applies.
            let closed = EgressPolicy::default();
            if firewall::apply_policy(&inner.netns, &closed, &blocked, Some(&[])).await.is_ok() {
                state.policy = closed;
                state.resolved.clear();
            }
            return Err(e);
        }
        state.resolved.retain(|ip, _| keep.iter().any(|(k, _)| k == ip));
        state.resolved.retain_names(|n| policy.allows_name(n));
        state.policy = policy;
        let kept: HashSet<Ipv4Addr> = keep.iter().map(|(ip, _)| *ip).collect();
        // The policy is in force either way; failing to cut is reported, not fatal.
        let connections_cut = match firewall::cut_denied(&inner.netns, &state.policy, &blocked, &kept).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(netns = %inner.netns, error = %e, "open connections the new policy denies were not cut");
                0
            }
        };
        Ok(PolicyChange { connections_cut })
    }

    pub async fn policy(&self) -> EgressPolicy {
        self.inner.state.lock().await.policy.clone()
    }

    /// Addresses the guest may reach because it resolved an allowed name, soonest expiry first.
    pub async fn resolved(&self) -> Vec<ResolvedAddress> {
        let state = self.inner.state.lock().await;
        let now = Instant::now();
        let mut list: Vec<ResolvedAddress> = state
            .resolved
            .live(now)
            .map(|(ip, e)| ResolvedAddress {
                addr: *ip,
                names: e.names.iter().cloned().collect(),
                expires_in: e.expires - now,
            })
            .collect();
        list.sort_by_key(|r| r.expires_in);
        list
    }

    /// Stops the resolver and closes its sockets, which would otherwise keep the namespace alive
    /// after it is deleted.
    pub fn stop(&self) {
        if let Some(server) = self.server.lock().expect("server slot poisoned").take() {
            server.shutdown_token().cancel();
            drop(server);
        }
    }
}

impl Drop for SandboxEgress {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Handler(Arc<Inner>);

enum Answer {
    Records(Vec<Record>),
    Code(ResponseCode),
}

impl Inner {
    async fn answer(&self, qname: &str, qtype: RecordType) -> Answer {
        if !self.state.lock().await.policy.allows_name(qname) {
            return Answer::Code(ResponseCode::NXDomain);
        }
        if qtype == RecordType::AAAA {
            // Sandboxes have no IPv6: an empty answer makes clients use IPv4 at once.
            return Answer::Records(Vec::new());
        }
        let Ok(mut name) = Name::from_ascii(qname) else { return Answer::Code(ResponseCode::FormErr) };
        name.set_fqdn(true);
        let lookup = match self.upstream.resolver.lookup(name, qtype).await {
            Ok(lookup) => lookup,
            Err(e) if e.is_nx_domain() => return Answer::Code(ResponseCode::NXDomain),
            Err(e) if e.is_no_records_found() => return Answer::Records(Vec::new()),
            Err(e) => {
                tracing::debug!(netns = %self.netns, qname, error = %e, "upstream lookup failed");
                return Answer::Code(ResponseCode::ServFail);
            }
        };
        let records = lookup.answers().to_vec();
        // Bounded by the lookup's own deadline, so repeated answers from the cache never extend
        // (and so never re-add) an element.
        let remaining = lookup.valid_until().saturating_duration_since(Instant::now());
        let addrs: Vec<(Ipv4Addr, Duration)> = records
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some((a.0, Duration::from_secs(u64::from(r.ttl)).min(remaining) + TTL_GRACE)),
                _ => None,
            })
            .collect();
        if addrs.is_empty() {
            return Answer::Records(records);
        }
        let mut state = self.state.lock().await;
        // The policy may have changed while the lookup was in flight.
        if !state.policy.allows_name(qname) {
            return Answer::Code(ResponseCode::NXDomain);
        }
        let now = Instant::now();
        let (fresh, refresh) = state.resolved.changes(&addrs, now);
        // Only an allowlist consults the set; under open the addresses are remembered anyway,
        // so a later switch to an allowlist keeps the names it still allows.
        if state.policy.mode == EgressMode::Allowlist && !(fresh.is_empty() && refresh.is_empty()) {
            // Each update is a process on the host: a guest asking for names without end gets
            // them at a metered pace, and SERVFAIL (clients retry) past it. Never an answer the
            // firewall does not match: the address would be dropped before its TTL ran out.
            if !state.resolved.may_update(now) {
                return Answer::Code(ResponseCode::ServFail);
            }
            if let Err(e) = firewall::add_resolved(&self.netns, &fresh, &refresh).await {
                tracing::warn!(netns = %self.netns, qname, error = %e, "cannot allow resolved addresses");
                return Answer::Code(ResponseCode::ServFail);
            }
        }
        for (ip, ttl) in addrs {
            state.resolved.remember(ip, ttl, qname, now);
        }
        Answer::Records(records)
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut response: R) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;
        let answer = match request.request_info() {
            Ok(info) => {
                let qname = info.query.name().to_string().trim_end_matches('.').to_ascii_lowercase();
                self.0.answer(&qname, info.query.query_type()).await
            }
            Err(_) => Answer::Code(ResponseCode::FormErr),
        };
        let sent = match &answer {
            Answer::Code(code) => {
                metadata.response_code = *code;
                response.send_response(builder.build_no_records(metadata)).await
            }
            Answer::Records(records) => {
                response.send_response(builder.build(metadata, records.iter(), [], [], [])).await
            }
        };
        sent.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "cannot send a DNS answer");
            hickory_proto::op::Header { metadata, counts: Default::default() }.into()
        })
    }
}
