//! The `Supervisor` gRPC service and its authentication.

use std::collections::HashMap;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, RwLock};
use tonic::{Request, Response, Status, Streaming};
use torpor_proto::supervisor::supervisor_server::Supervisor;
use torpor_proto::supervisor::*;
use torpor_proto::{AUTH_HEADER, VERSION};

use crate::reaper::Reaper;
use crate::{exec, files};

pub struct Service {
    /// The secret every call must carry; replaced by `SetIdentity` in a clone.
    pub secret: Arc<std::sync::RwLock<String>>,
    pub reaper: Reaper,
    pub running: exec::Running,
    pub default_env: Arc<RwLock<HashMap<String, String>>>,
    pub shutdown: mpsc::Sender<()>,
}

/// Refuses every call that does not carry the sandbox secret.
pub fn authenticator(
    secret: Arc<std::sync::RwLock<String>>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        let expected = format!("Bearer {}", secret.read().expect("secret lock poisoned"));
        let given = req.metadata().get(AUTH_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
        if bool::from(given.ct_eq(expected.as_bytes())) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("missing or wrong sandbox secret"))
        }
    }
}

#[tonic::async_trait]
impl Supervisor for Service {
    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse { version: VERSION.to_owned() }))
    }

    type ExecStream = exec::OutputStream;

    async fn exec(&self, req: Request<Streaming<ExecInput>>) -> Result<Response<Self::ExecStream>, Status> {
        let env = self.default_env.read().await.clone();
        let stream = exec::start(&self.reaper, &self.running, &env, req.into_inner()).await?;
        Ok(Response::new(stream))
    }

    async fn signal(&self, req: Request<SignalRequest>) -> Result<Response<SignalResponse>, Status> {
        let req = req.into_inner();
        self.running.signal(&req.exec_id, req.signal)?;
        Ok(Response::new(SignalResponse {}))
    }

    type ReadFileStream = files::ReadStream;

    async fn read_file(&self, req: Request<ReadFileRequest>) -> Result<Response<Self::ReadFileStream>, Status> {
        Ok(Response::new(files::read(&req.into_inner().path).await?))
    }

    async fn write_file(&self, req: Request<Streaming<WriteFileInput>>) -> Result<Response<WriteFileResponse>, Status> {
        let bytes_written = files::write(req.into_inner()).await?;
        Ok(Response::new(WriteFileResponse { bytes_written }))
    }

    async fn set_env(&self, req: Request<SetEnvRequest>) -> Result<Response<SetEnvResponse>, Status> {
        let req = req.into_inner();
        if let Some(bad) = req.env.keys().find(|k| k.is_empty() || k.contains('=') || k.contains('\0')) {
            return Err(Status::invalid_argument(format!("invalid environment variable name {bad:?}")));
        }
        let mut env = self.default_env.write().await;
        if req.replace {
            env.clear();
        }
        env.extend(req.env);
        Ok(Response::new(SetEnvResponse {}))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(crate::info::collect().map_err(|e| Status::internal(format!("{e:#}")))?))
    }

    async fn set_identity(&self, req: Request<IdentityRequest>) -> Result<Response<IdentityResponse>, Status> {
        let req = req.into_inner();
        if req.new_secret.len() < 32 {
            return Err(Status::invalid_argument("the new secret is too short"));
        }
        crate::identity::apply(&req).map_err(|e| Status::internal(format!("{e:#}")))?;
        *self.secret.write().expect("secret lock poisoned") = req.new_secret;
        Ok(Response::new(IdentityResponse {}))
    }

    async fn set_clock(&self, req: Request<SetClockRequest>) -> Result<Response<SetClockResponse>, Status> {
        let nanos = req.into_inner().unix_nanos;
        let ts = nix::sys::time::TimeSpec::new(nanos.div_euclid(1_000_000_000), nanos.rem_euclid(1_000_000_000));
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
            .map_err(|e| Status::permission_denied(format!("setting the clock: {e}")))?;
        Ok(Response::new(SetClockResponse {}))
    }

    async fn shutdown(&self, _: Request<ShutdownRequest>) -> Result<Response<ShutdownResponse>, Status> {
        let _ = self.shutdown.try_send(());
        Ok(Response::new(ShutdownResponse {}))
    }
}
