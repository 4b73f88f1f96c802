//! The host's client for one sandbox's supervisor.

use std::net::SocketAddr;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};
use torpor_proto::supervisor::supervisor_client::SupervisorClient;
use torpor_proto::supervisor::*;
use torpor_proto::AUTH_HEADER;

#[derive(Clone)]
pub struct Auth {
    header: MetadataValue<tonic::metadata::Ascii>,
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert(AUTH_HEADER, self.header.clone());
        Ok(req)
    }
}

pub type Client = SupervisorClient<InterceptedService<Channel, Auth>>;
pub type AgentClient = torpor_proto::supervisor::agent_client::AgentClient<InterceptedService<Channel, Auth>>;

#[derive(Clone)]
pub struct GuestClient {
    client: Client,
    /// The same connection, for the agent service.
    agent: AgentClient,
}

impl GuestClient {
    /// Connects lazily: nothing is dialled until the first call.
    pub fn new(addr: SocketAddr, secret: &str) -> Self {
        Self::with_connect_timeout(addr, secret, Duration::from_secs(2))
    }

    /// For polling a guest that is only just starting: a SYN it missed is not retransmitted by
    /// the kernel for a whole second, so give up on a connect quickly and dial again instead.
    pub fn probe(addr: SocketAddr, secret: &str) -> Self {
        Self::with_connect_timeout(addr, secret, Duration::from_millis(100))
    }

    fn with_connect_timeout(addr: SocketAddr, secret: &str, connect_timeout: Duration) -> Self {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .expect("a socket address is a valid URI")
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30));
        let channel = endpoint.connect_lazy();
        let header = format!("Bearer {secret}").parse().expect("hex secret is valid ASCII");
        let auth = Auth { header };
        let agent =
            torpor_proto::supervisor::agent_client::AgentClient::with_interceptor(channel.clone(), auth.clone());
        let client = SupervisorClient::with_interceptor(channel, auth).max_decoding_message_size(16 * 1024 * 1024);
        Self { client, agent }
    }

    pub fn raw(&self) -> Client {
        self.client.clone()
    }

    pub fn agent(&self) -> AgentClient {
        self.agent.clone()
    }

    pub async fn health(&self, timeout: Duration) -> Result<HealthResponse, Status> {
        let mut req = Request::new(HealthRequest {});
        req.set_timeout(timeout);
        Ok(self.raw().health(req).await?.into_inner())
    }

    pub async fn set_env(&self, env: std::collections::HashMap<String, String>) -> Result<(), Status> {
        self.raw().set_env(SetEnvRequest { env, replace: false }).await?;
        Ok(())
    }

    pub async fn shutdown(&self, timeout: Duration) -> Result<(), Status> {
        let mut req = Request::new(ShutdownRequest {});
        req.set_timeout(timeout);
        self.raw().shutdown(req).await?;
        Ok(())
    }

    pub async fn signal(&self, exec_id: &str, signal: i32) -> Result<(), Status> {
        self.raw().signal(SignalRequest { exec_id: exec_id.to_owned(), signal }).await?;
        Ok(())
    }

    /// Sets the guest's wall clock to the host's now.
    pub async fn sync_clock(&self) -> Result<(), Status> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let mut req = Request::new(SetClockRequest { unix_nanos: now.as_nanos() as i64 });
        req.set_timeout(Duration::from_secs(5));
        self.raw().set_clock(req).await?;
        Ok(())
    }

    pub async fn set_identity(&self, req: IdentityRequest) -> Result<(), Status> {
        let mut req = Request::new(req);
        req.set_timeout(Duration::from_secs(10));
        self.raw().set_identity(req).await?;
        Ok(())
    }

    pub async fn info(&self) -> Result<InfoResponse, Status> {
        Ok(self.raw().info(InfoRequest {}).await?.into_inner())
    }
}
