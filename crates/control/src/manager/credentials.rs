//! Credentials a sandbox holds: its device token (see `identity`) with the address of the
//! Torpor API as the guest reaches it, a GitHub App installation token scoped to its
//! repositories, the model proxy's endpoints with its proxy token, and the static secrets it
//! was given. They are pushed to the supervisor at create, on every resume and before they
//! expire while the sandbox runs: new execs find them in their environment, long-running
//! processes in files under `/run/torpor/credentials` (always the current value), and git in
//! the image's credential helper, which reads those files.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use torpor_proto::{GUEST_API_PORT, GUEST_GATEWAY};

use super::{now_ms, Busy, Live, Manager};
use crate::error::ApiError;
use crate::github::{GitHubError, InstallationToken};
use crate::guest::GuestClient;
use crate::proxy::Tally;
use crate::store::Record;
use torpor_api::GitHubGrant;
use torpor_api::ModelFlavour;

/// Where the guest finds each credential as a file, named like its environment variable.
pub const CREDENTIALS_DIR: &str = "/run/torpor/credentials";
/// Owner of every sandbox until there are users.
const OWNER: &str = "local";
/// After a failed delivery (GitHub unreachable, say), the next attempt; doubled after each
/// further failure, up to `RETRY_MAX`.
const RETRY_AFTER: Duration = Duration::from_secs(10);
const RETRY_MAX: Duration = Duration::from_secs(320);
/// Credentials whose value never changes for a sandbox: their files are written once.
const STATIC: [&str; 7] = [
    "TORPOR_URL",
    "TORPOR_SANDBOX_ID",
    "GITHUB_HOST",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_API_KEY",
];

/// The outcome of one delivery.
pub(super) struct Pushed {
    /// When the earliest credential is due for renewal (ms since the epoch).
    refresh_at_ms: u64,
    /// False when a GitHub token could not be had: the rest was delivered.
    complete: bool,
}

/// A live sandbox's credential deliveries: when the next is due, and how the last ones went.
#[derive(Default)]
pub(super) struct Delivery {
    /// Ms since the epoch; 0 = none attempted yet.
    refresh_ms: AtomicU64,
    in_flight: AtomicBool,
    /// The files that never change were written.
    statics_written: AtomicBool,
    /// Failed deliveries in a row, for the back-off.
    failures: AtomicU32,
}

impl Delivery {
    pub(super) fn pushed(&self) -> bool {
        self.refresh_ms.load(Ordering::SeqCst) != 0
    }

    /// A whole delivery (the files that never change too), at the refresher's next sweep.
    pub(super) fn due_now(&self) {
        self.statics_written.store(false, Ordering::SeqCst);
        self.refresh_ms.store(now_ms().max(1), Ordering::SeqCst);
    }

    /// Schedules the next delivery after one that wrote the static files (`first`) or not
    /// (then, on a resume, the guest kept them from before).
    pub(super) fn record(&self, id: &str, result: &Result<Pushed, ApiError>, first: bool) {
        let now = now_ms();
        let backoff = |failures: u32| {
            let delay = RETRY_AFTER.saturating_mul(1 << failures.saturating_sub(1).min(5)).min(RETRY_MAX);
            now + delay.as_millis() as u64
        };
        match result {
            Ok(pushed) => {
                self.statics_written.store(true, Ordering::SeqCst);
                let mut next = pushed.refresh_at_ms;
                if pushed.complete {
                    self.failures.store(0, Ordering::SeqCst);
                } else {
                    next = next.min(backoff(self.failures.fetch_add(1, Ordering::SeqCst) + 1));
                }
                self.refresh_ms.store(next.max(1), Ordering::SeqCst);
            }
            Err(e) => {
                if first {
                    self.statics_written.store(false, Ordering::SeqCst);
                }
                let failures = self.failures.fetch_add(1, Ordering::SeqCst) + 1;
                tracing::warn!(%id, error = %e.message, failures, "delivering credentials failed; retrying");
                self.refresh_ms.store(backoff(failures), Ordering::SeqCst);
            }
        }
    }
}

impl Manager {
    pub(super) fn credential_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.credential_locks.lock().expect("lock table poisoned").entry(id.to_owned()).or_default().clone()
    }

    /// Issues the sandbox's credentials and hands them to its supervisor. `first`: also write
    /// the files that never change (they live in the guest's memory, so a resume keeps them);
    /// later pushes write only what changes, as every round trip here is on the resume path.
    pub(super) async fn push_credentials(
        &self,
        id: &str,
        guest: &GuestClient,
        first: bool,
    ) -> Result<Pushed, ApiError> {
        let lock = self.credential_lock(id);
        let _one_at_a_time = lock.lock().await;
        let rec = self.record(id).await?;
        let (token, exp) = self.tokens.issue(id, OWNER).map_err(|e| ApiError::internal(e.to_string()))?;
        let mut refresh_at = exp * 1000 - self.tokens.ttl().as_millis() as u64 / 2;
        let mut creds = HashMap::from([
            ("TORPOR_TOKEN".to_owned(), token),
            ("TORPOR_URL".to_owned(), format!("http://{GUEST_GATEWAY}:{GUEST_API_PORT}")),
            ("TORPOR_SANDBOX_ID".to_owned(), id.to_owned()),
        ]);
        // Read afresh every time: a rotated file reaches the sandbox on its next resume.
        for name in &rec.secrets {
            let value = self.cfg.read_secret(name).map_err(|e| ApiError::internal(format!("sandbox {id}: {e}")))?;
            creds.insert(name.clone(), value);
        }
        self.model_credentials(&rec, &mut creds);
        let mut github_failed = None;
        let mut replaced = None;
        if let (Some(grant), Some(broker)) = (&rec.github, &self.github) {
            match self.github_token(id, grant).await {
                Ok((token, old)) => {
                    refresh_at = refresh_at.min(token.refresh_at_ms());
                    creds.insert("GITHUB_TOKEN".into(), token.token);
                    creds.insert("GITHUB_HOST".into(), broker.git_host());
                    replaced = old;
                }
                // The rest is still delivered; the refresher tries GitHub again (see `Delivery`).
                Err(e) => github_failed = Some(e),
            }
        }
        // All at once: this is on the resume path, and each is a round trip to the guest.
        let writes = creds.iter().filter(|(name, _)| first || !STATIC.contains(&name.as_str())).map(
            |(name, value)| async move {
                guest
                    .write_small_file(&format!("{CREDENTIALS_DIR}/{name}"), value.as_bytes(), 0o600)
                    .await
                    .map_err(|e| ApiError::internal(format!("writing {name} into sandbox {id}: {e}")))
            },
        );
        let env = guest.set_env(creds.clone(), false);
        let (written, env) = futures::join!(futures::future::join_all(writes), env);
        written.into_iter().collect::<Result<Vec<()>, _>>()?;
        env.map_err(ApiError::from_guest)?;
        // Only now that the guest holds its successor: a token in use is never revoked.
        if let (Some(old), Some(broker)) = (replaced, self.github.clone()) {
            tokio::spawn(async move { broker.revoke(&old.token).await });
        }
        if let Some(e) = &github_failed {
            tracing::warn!(%id, error = %e, "no fresh GitHub token for the sandbox");
        }
        Ok(Pushed { refresh_at_ms: refresh_at, complete: github_failed.is_none() })
    }

    /// Takes the sandbox's credentials out of its guest before it becomes a template, whose
    /// snapshot every clone starts from: the default environment goes back to what the sandbox
    /// was created with, and every credential file is emptied (clones get their own at create;
    /// an empty `GITHUB_HOST` makes git's helper answer nothing).
    /// Callers hold the sandbox's credential lock until the snapshot is taken.
    pub(super) async fn strip_credentials(&self, rec: &Record, guest: &GuestClient) -> Result<(), ApiError> {
        let env = rec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let reset = guest.set_env(env, true);
        let mut names: Vec<String> = STATIC.iter().map(|n| n.to_string()).collect();
        names.extend(["TORPOR_TOKEN".into(), "GITHUB_TOKEN".into()]);
        names.extend(rec.secrets.iter().cloned());
        let blanks = names.iter().map(|name| async move {
            guest
                .write_small_file(&format!("{CREDENTIALS_DIR}/{name}"), b"", 0o600)
                .await
                .map_err(|e| ApiError::internal(format!("clearing {name} in sandbox {}: {e}", rec.id)))
        });
        let (reset, blanked) = futures::join!(reset, futures::future::join_all(blanks));
        reset.map_err(ApiError::from_guest)?;
        blanked.into_iter().collect::<Result<Vec<()>, _>>()?;
        Ok(())
    }

    /// The proxy's endpoints and this sandbox's token for each model API it was granted.
    fn model_credentials(&self, rec: &Record, creds: &mut HashMap<String, String>) {
        let Some(grant) = &rec.models else { return };
        let token = self.proxy.token_for(&rec.id);
        for flavour in [ModelFlavour::Anthropic, ModelFlavour::Openai] {
            if !grant.allows(flavour) {
                continue;
            }
            let prefix = flavour.as_str().to_ascii_uppercase();
            creds.insert(format!("{prefix}_BASE_URL"), crate::proxy::guest_base_url(flavour));
            creds.insert(format!("{prefix}_API_KEY"), token.clone());
        }
    }

    /// The sandbox's current installation token, or a new one once the current is past half
    /// its life, with the token it replaces (for the caller to revoke once the guest holds the
    /// new one). Callers hold the sandbox's credential lock.
    pub(super) async fn github_token(
        &self,
        id: &str,
        grant: &GitHubGrant,
    ) -> Result<(InstallationToken, Option<InstallationToken>), GitHubError> {
        let broker = self.github.as_ref().expect("checked by the caller");
        let current = self.github_tokens.lock().expect("token table poisoned").get(id).cloned();
        if let Some(token) = current.as_ref().filter(|t| now_ms() < t.refresh_at_ms()) {
            return Ok((token.clone(), None));
        }
        let fresh = broker.mint(grant).await?;
        tracing::info!(%id, expires_in_s = (fresh.expires_ms.saturating_sub(now_ms())) / 1000, "new GitHub token");
        self.github_tokens.lock().expect("token table poisoned").insert(id.to_owned(), fresh.clone());
        // Removed while the token was being minted: `forget_credentials` ran before the insert
        // above or will see it; either way no token outlives its sandbox.
        if matches!(self.store.get(id).await, Ok(None)) {
            self.forget_credentials(id);
            return Err(GitHubError::Refused { status: 404, message: format!("sandbox {id} was removed") });
        }
        Ok((fresh, current))
    }

    /// For a sandbox that is gone: its GitHub token is revoked rather than left to expire.
    pub(super) fn forget_credentials(&self, id: &str) {
        self.credential_locks.lock().expect("lock table poisoned").remove(id);
        let token = self.github_tokens.lock().expect("token table poisoned").remove(id);
        if let (Some(token), Some(broker)) = (token, self.github.clone()) {
            tokio::spawn(async move { broker.revoke(&token.token).await });
        }
    }

    /// Renews the credentials of running sandboxes that are due (a sweep a second apart
    /// leaves ample margin before anything expires). Called from the idle sweep.
    pub(super) fn refresh_due_credentials(self: &Arc<Self>, candidates: &[(String, Arc<Live>)]) {
        let now = now_ms();
        for (id, live) in candidates {
            let delivery = &live.credentials;
            let due = delivery.refresh_ms.load(Ordering::SeqCst);
            if due == 0 || now < due || delivery.in_flight.swap(true, Ordering::SeqCst) {
                continue;
            }
            let (manager, id, live) = (self.clone(), id.clone(), live.clone());
            tokio::spawn(async move {
                let first = !live.credentials.statics_written.load(Ordering::SeqCst);
                let pushed = manager.push_credentials(&id, &live.guest, first).await;
                live.credentials.record(&id, &pushed, first);
                live.credentials.in_flight.store(false, Ordering::SeqCst);
            });
        }
    }

    /// The sandbox's record, for the model proxy to check its grant and budget.
    pub async fn model_access(&self, id: &str) -> Result<Record, ApiError> {
        self.record(id).await
    }

    /// Marks the sandbox busy while a proxied model request runs, if it is live here.
    pub fn busy(&self, id: &str) -> Option<Busy> {
        self.live_handle(id).map(|live| live.busy())
    }

    pub async fn record_model_usage(&self, id: &str, tally: Tally) {
        if let Err(e) = self.store.add_model_usage(id, tally.input_tokens, tally.output_tokens).await {
            tracing::warn!(%id, error = %e, "recording model usage failed");
        }
    }
}

/// How a failed token exchange reads to whoever asked for the sandbox.
pub(super) fn github_error(e: crate::github::GitHubError) -> ApiError {
    use crate::github::GitHubError;
    match &e {
        // The scope asked for does not fit the installation: the request's fault.
        GitHubError::Refused { status: 404 | 422, .. } => ApiError::invalid(e.to_string()),
        GitHubError::Refused { .. } | GitHubError::Unreachable { .. } => ApiError::unavailable(e.to_string()),
        GitHubError::Key(_) | GitHubError::Malformed(_) => ApiError::internal(e.to_string()),
    }
}
