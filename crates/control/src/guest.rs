//! The host's client for one sandbox's supervisor.
//!
//! The supervisor runs in the guest, which may be hostile: every call has a deadline on the
//! host's side (a guest that ignores `grpc-timeout`, or answers pings but never the call, still
//! cannot hold a lifecycle operation, start-up or a lock), and answers are size-limited.

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

/// Deadline of a call whose answer the guest has no reason to delay.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// `call`, or `DeadlineExceeded` once `CALL_TIMEOUT` has passed.
pub async fn within<T>(call: impl std::future::Future<Output = Result<T, Status>>) -> Result<T, Status> {
    tokio::time::timeout(CALL_TIMEOUT, call).await.unwrap_or_else(|_| {
        Err(Status::deadline_exceeded(format!("the guest did not answer within {} s", CALL_TIMEOUT.as_secs())))
    })
}

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
        let answer = tokio::time::timeout(timeout, self.raw().health(req))
            .await
            .map_err(|_| Status::deadline_exceeded(format!("no answer within {} ms", timeout.as_millis())))??;
        Ok(answer.into_inner())
    }

    /// Adds to (or, `replace`, replaces) the environment every new exec starts with.
    pub async fn set_env(&self, env: std::collections::HashMap<String, String>, replace: bool) -> Result<(), Status> {
        within(self.raw().set_env(SetEnvRequest { env, replace })).await?;
        Ok(())
    }

    pub async fn shutdown(&self, timeout: Duration) -> Result<(), Status> {
        let mut req = Request::new(ShutdownRequest {});
        req.set_timeout(timeout);
        tokio::time::timeout(timeout, self.raw().shutdown(req))
            .await
            .map_err(|_| Status::deadline_exceeded("the guest did not acknowledge the shutdown"))??;
        Ok(())
    }

    pub async fn signal(&self, exec_id: &str, signal: i32) -> Result<(), Status> {
        within(self.raw().signal(SignalRequest { exec_id: exec_id.to_owned(), signal })).await?;
        Ok(())
    }

    /// Sets the guest's wall clock to the host's now.
    pub async fn sync_clock(&self) -> Result<(), Status> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        within(self.raw().set_clock(SetClockRequest { unix_nanos: now.as_nanos() as i64 })).await?;
        Ok(())
    }

    pub async fn set_identity(&self, req: IdentityRequest) -> Result<(), Status> {
        within(self.raw().set_identity(req)).await?;
        Ok(())
    }

    pub async fn info(&self) -> Result<InfoResponse, Status> {
        Ok(within(self.raw().info(InfoRequest {})).await?.into_inner())
    }

    /// Writes a small file in the guest, atomically, creating its directory.
    pub async fn write_small_file(&self, path: &str, data: &[u8], mode: u32) -> Result<(), Status> {
        let header = WriteFileHeader { path: path.to_owned(), mode, owner: String::new(), create_parents: true };
        let messages = vec![
            WriteFileInput { kind: Some(write_file_input::Kind::Header(header)) },
            WriteFileInput { kind: Some(write_file_input::Kind::Data(data.to_vec())) },
        ];
        within(self.raw().write_file(tokio_stream::iter(messages))).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A "guest" that accepts connections and never says anything: every call must still end.
    #[tokio::test]
    async fn a_guest_that_never_answers_cannot_hold_a_call() {
        let guest = GuestClient::new(crate::api::tests::silent_server().await, "00");
        let (file, env, info) = tokio::join!(
            guest.write_small_file("/run/torpor/credentials/X", b"v", 0o600),
            guest.set_env(Default::default(), false),
            guest.info(),
        );
        for e in [file.unwrap_err(), env.unwrap_err(), info.map(drop).unwrap_err()] {
            assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e}");
        }
    }
}
