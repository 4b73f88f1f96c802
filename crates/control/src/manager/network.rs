//! Each sandbox's network: its namespace (torpor-net) and its egress, the policy in force in the
//! namespace's firewall plus the resolver serving the guest. Egress lives as long as the
//! namespace, which a pause keeps: a paused sandbox's rules stay in the kernel, its resolver is
//! an idle task, and both are exactly as they were when it resumes.

use std::sync::Arc;

use torpor_net::{SandboxEgress, SandboxNet};

use super::Manager;
use crate::error::ApiError;
use crate::model::PolicyExt;
use crate::store::Record;
use torpor_api::{NetworkPolicy, NetworkStatus, ResolvedAddress, State};

impl Manager {
    /// Namespace, links, firewall and resolver, with the sandbox's stored policy. On failure
    /// nothing is left behind.
    pub(super) async fn setup_net(&self, rec: &Record) -> Result<SandboxNet, ApiError> {
        let net = self.net_for(rec);
        net.setup(Some(self.vm_uid(rec)))
            .await
            .map_err(|e| ApiError::internal(format!("setting up the sandbox network: {e}")))?;
        if let Err(e) = self.start_egress(rec, &net).await {
            let _ = net.teardown().await;
            return Err(e);
        }
        Ok(net)
    }

    /// Applies the stored policy to an existing namespace and (re)starts its resolver.
    pub(super) async fn start_egress(&self, rec: &Record, net: &SandboxNet) -> Result<(), ApiError> {
        // From the store, not `rec`: a policy replaced since `rec` was read must win.
        let stored = self.store.get(&rec.id).await?.map(|r| r.network).unwrap_or_else(|| rec.network.clone());
        let policy = stored.to_egress()?;
        // A resolver still bound in this namespace would hold the port the new one needs.
        self.stop_egress(&rec.id);
        let egress = SandboxEgress::start(&net.netns, self.pool.net(), policy, self.upstream.clone())
            .await
            .map_err(|e| ApiError::internal(format!("starting the egress policy of sandbox {}: {e}", rec.id)))?;
        self.egress.lock().expect("egress table poisoned").insert(rec.id.clone(), Arc::new(egress));
        self.start_guest_api(&rec.id, net)?;
        Ok(())
    }

    /// The sandbox's API (see `guest_api`) on its gateway address, inside its namespace: the
    /// guest's only way to the control plane.
    fn start_guest_api(&self, id: &str, net: &SandboxNet) -> Result<(), ApiError> {
        let Some(router) = self.guest_api.get().cloned() else { return Ok(()) };
        let addr: std::net::SocketAddr = (
            torpor_proto::GUEST_GATEWAY.parse::<std::net::Ipv4Addr>().expect("constant"),
            torpor_proto::GUEST_API_PORT,
        )
            .into();
        let listener = torpor_net::with_netns(&net.netns, move || {
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .and_then(tokio::net::TcpListener::from_std)
        .map_err(|e| ApiError::internal(format!("serving the API to sandbox {id}: {e}")))?;
        // Stopped gracefully, so open keep-alive connections close too: their sockets would
        // keep the namespace alive.
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(crate::guest_api::serve(listener, router, id.to_owned(), stop.clone()));
        if let Some(old) = self.guest_api_tasks.lock().expect("guest api table poisoned").insert(id.to_owned(), stop) {
            old.cancel();
        }
        Ok(())
    }

    /// The resolver holds sockets in the namespace, which would keep it alive: it stops first.
    pub(super) async fn teardown_net(&self, rec: &Record) -> Result<(), ApiError> {
        self.stop_egress(&rec.id);
        self.net_for(rec).teardown().await.map_err(|e| ApiError::internal(e.to_string()))
    }

    pub(super) fn stop_egress(&self, id: &str) {
        if let Some(stop) = self.guest_api_tasks.lock().expect("guest api table poisoned").remove(id) {
            stop.cancel();
        }
        if let Some(egress) = self.egress.lock().expect("egress table poisoned").remove(id) {
            egress.stop();
        }
    }

    pub(super) fn has_egress(&self, id: &str) -> bool {
        self.egress.lock().expect("egress table poisoned").contains_key(id)
    }

    fn egress_of(&self, id: &str) -> Option<Arc<SandboxEgress>> {
        self.egress.lock().expect("egress table poisoned").get(id).cloned()
    }

    pub async fn network(&self, id: &str) -> Result<NetworkStatus, ApiError> {
        let rec = self.record(id).await?;
        Ok(self.network_status(&rec.id, rec.network).await)
    }

    async fn network_status(&self, id: &str, policy: NetworkPolicy) -> NetworkStatus {
        let egress = self.egress_of(id);
        // In force: a live firewall holding exactly the stored policy.
        let enforced = match (&egress, policy.to_egress()) {
            (Some(e), Ok(stored)) => e.policy().await == stored,
            _ => false,
        };
        let resolved = match &egress {
            Some(e) => e
                .resolved()
                .await
                .into_iter()
                .map(|r| ResolvedAddress {
                    address: r.addr.to_string(),
                    names: r.names.into_iter().collect(),
                    expires_in_secs: r.expires_in.as_secs(),
                })
                .collect(),
            None => Vec::new(),
        };
        NetworkStatus { policy, enforced, resolved }
    }

    /// Replaces the policy. Stored first, so it holds after any restart; then applied to the
    /// live firewall, which cuts connections the new policy denies.
    pub async fn set_network(&self, id: &str, policy: NetworkPolicy) -> Result<NetworkStatus, ApiError> {
        let policy = policy.canonical(&self.cfg.package_registries)?;
        let egress_policy = policy.to_egress()?;
        self.record(id).await?;
        // No lifecycle operation may set up or tear down the namespace meanwhile.
        let lock = self.op_lock(id);
        let _op = lock.lock().await;
        let rec = self.record(id).await?;
        // A create does not hold the op lock: its egress could start from the old policy.
        if matches!(rec.state, State::Creating | State::Stopping) {
            return Err(ApiError::conflict(format!("sandbox {id} is {}; try again when it settles", rec.state)));
        }
        self.store.set_network(id, &policy).await?;
        if let Some(egress) = self.egress_of(id) {
            let change = egress.set_policy(egress_policy).await.map_err(|e| {
                ApiError::internal(format!(
                    "applying the network policy of sandbox {id} failed, so it now allows nothing (deny-all) until a \
                     policy applies: {e}"
                ))
            })?;
            tracing::info!(%id, mode = ?policy.mode, connections_cut = change.connections_cut, "network policy replaced");
        }
        Ok(self.network_status(id, policy).await)
    }
}
