//! Credentials a sandbox holds: for now its device token (see `identity`), with the address
//! of the Torpor API as the guest reaches it. They are pushed to the supervisor at create, on
//! every resume and before they expire while the sandbox runs: new execs find them in their
//! environment, long-running processes in files under `/run/torpor/credentials` (always the
//! current value).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use torpor_proto::supervisor::{write_file_input, WriteFileHeader, WriteFileInput};
use torpor_proto::{GUEST_API_PORT, GUEST_GATEWAY};

use super::{now_ms, Live, Manager};
use crate::error::ApiError;
use crate::guest::GuestClient;

/// Where the guest finds each credential as a file, named like its environment variable.
pub const CREDENTIALS_DIR: &str = "/run/torpor/credentials";
/// Owner of every sandbox until there are users.
const OWNER: &str = "local";

impl Manager {
    /// Issues the sandbox's credentials and hands them to its supervisor; returns when they
    /// expire (ms since the epoch). `first`: also write the files that never change (they live
    /// in the guest's memory, so a resume keeps them); later pushes write only the token, as
    /// every round trip here is on the resume path.
    pub(super) async fn push_credentials(&self, id: &str, guest: &GuestClient, first: bool) -> Result<u64, ApiError> {
        let (token, exp) = self.tokens.issue(id, OWNER).map_err(|e| ApiError::internal(e.to_string()))?;
        let secrets = self.store.get(id).await?.map(|r| r.secrets).unwrap_or_default();
        let mut creds = HashMap::from([
            ("TORPOR_TOKEN".to_owned(), token),
            ("TORPOR_URL".to_owned(), format!("http://{GUEST_GATEWAY}:{GUEST_API_PORT}")),
            ("TORPOR_SANDBOX_ID".to_owned(), id.to_owned()),
        ]);
        // Read afresh every time: a rotated file reaches the sandbox on its next resume.
        for name in secrets {
            let value = self.cfg.read_secret(&name).map_err(|e| ApiError::internal(format!("sandbox {id}: {e}")))?;
            creds.insert(name, value);
        }
        // All at once: this is on the resume path, and each is a round trip to the guest.
        // Those that never change are written once; the token and the secrets every time.
        let static_names = ["TORPOR_URL", "TORPOR_SANDBOX_ID"];
        let writes = creds.iter().filter(|(name, _)| first || !static_names.contains(&name.as_str())).map(
            |(name, value)| async move {
                write_guest_file(guest, &format!("{CREDENTIALS_DIR}/{name}"), value.as_bytes(), 0o600)
                    .await
                    .map_err(|e| ApiError::internal(format!("writing {name} into sandbox {id}: {e}")))
            },
        );
        let env = guest.set_env(creds.clone());
        let (written, env) = futures::join!(futures::future::join_all(writes), env);
        written.into_iter().collect::<Result<Vec<()>, _>>()?;
        env.map_err(ApiError::from_guest)?;
        Ok(exp * 1000)
    }

    /// Re-issues credentials of running sandboxes whose tokens are past half their lifetime
    /// (a sweep a second apart leaves ample margin). Called from the idle sweep.
    pub(super) fn refresh_due_credentials(self: &Arc<Self>, candidates: &[(String, Arc<Live>)]) {
        let ttl_ms = self.tokens.ttl().as_millis() as u64;
        let now = now_ms();
        for (id, live) in candidates {
            let expires = live.credentials_expire_ms.load(Ordering::SeqCst);
            if expires == 0 || now + ttl_ms / 2 < expires || live.refreshing.swap(true, Ordering::SeqCst) {
                continue;
            }
            let (manager, id, live) = (self.clone(), id.clone(), live.clone());
            tokio::spawn(async move {
                match manager.push_credentials(&id, &live.guest, false).await {
                    Ok(exp) => live.credentials_expire_ms.store(exp, Ordering::SeqCst),
                    Err(e) => tracing::warn!(%id, error = %e.message, "refreshing credentials failed; retrying"),
                }
                live.refreshing.store(false, Ordering::SeqCst);
            });
        }
    }
}

/// Writes a small file in the guest, atomically, creating its directory.
async fn write_guest_file(guest: &GuestClient, path: &str, data: &[u8], mode: u32) -> Result<(), tonic::Status> {
    let header = WriteFileHeader { path: path.to_owned(), mode, owner: String::new(), create_parents: true };
    let messages = vec![
        WriteFileInput { kind: Some(write_file_input::Kind::Header(header)) },
        WriteFileInput { kind: Some(write_file_input::Kind::Data(data.to_vec())) },
    ];
    guest.raw().write_file(tokio_stream::iter(messages)).await?;
    Ok(())
}
