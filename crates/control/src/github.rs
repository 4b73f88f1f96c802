//! GitHub App installation tokens: the daemon signs a short JWT with the app's private key
//! (RS256) and exchanges it for a token scoped to a sandbox's repositories and permissions,
//! valid for at most an hour. The private key stays on the host; the guest only ever holds the
//! installation token, which GitHub itself expires.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use crate::config::GitHubApp;
use torpor_api::GitHubGrant;

/// GitHub refuses app JWTs that live longer than ten minutes; a minute of slack either side
/// absorbs clock skew between this host and GitHub.
const APP_JWT_LIFETIME_SECS: u64 = 9 * 60;
const CLOCK_SKEW_SECS: u64 = 60;
const API_VERSION: &str = "2022-11-28";

#[derive(Debug, thiserror::Error)]
pub enum GitHubError {
    #[error("GitHub App private key: {0}")]
    Key(String),
    #[error("calling GitHub at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("GitHub refused the installation token ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("GitHub answered with something that is not an installation token: {0}")]
    Malformed(String),
}

/// A token and when it stops working.
#[derive(Clone)]
pub struct InstallationToken {
    pub token: String,
    /// Milliseconds since the epoch.
    pub issued_ms: u64,
    pub expires_ms: u64,
}

impl std::fmt::Debug for InstallationToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstallationToken").field("expires_ms", &self.expires_ms).finish_non_exhaustive()
    }
}

impl InstallationToken {
    /// Half its life: when a fresh one is due.
    pub fn refresh_at_ms(&self) -> u64 {
        self.issued_ms + self.expires_ms.saturating_sub(self.issued_ms) / 2
    }
}

pub struct GitHubBroker {
    app: GitHubApp,
    key: EncodingKey,
    http: reqwest::Client,
}

#[derive(Serialize)]
struct AppClaims<'a> {
    iat: u64,
    exp: u64,
    iss: &'a str,
}

#[derive(Serialize)]
struct TokenRequest<'a> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    repositories: Vec<String>,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    permissions: &'a std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct TokenResponse {
    token: String,
    expires_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Deserialize)]
struct GitHubErrorBody {
    message: String,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl GitHubBroker {
    pub fn new(app: &GitHubApp) -> Result<Self, GitHubError> {
        let pem =
            crate::config::read_private("github.private_key_file", &app.private_key_file).map_err(GitHubError::Key)?;
        let key = EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| {
            GitHubError::Key(format!("{}: not an RSA private key in PEM: {e}", app.private_key_file.display()))
        })?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("torpor/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            // The app JWT and the tokens go to the configured API and nowhere else.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| GitHubError::Unreachable { url: app.api_url.clone(), message: e.to_string() })?;
        Ok(Self { app: app.clone(), key, http })
    }

    pub fn git_host(&self) -> String {
        self.app.git_host()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.app.api_url.trim_end_matches('/'))
    }

    fn app_jwt(&self) -> Result<String, GitHubError> {
        let now = now_ms() / 1000;
        let claims = AppClaims { iat: now - CLOCK_SKEW_SECS, exp: now + APP_JWT_LIFETIME_SECS, iss: &self.app.app_id };
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
            .map_err(|e| GitHubError::Key(format!("signing the app JWT: {e}")))
    }

    /// A new installation token limited to `grant`.
    pub async fn mint(&self, grant: &GitHubGrant) -> Result<InstallationToken, GitHubError> {
        let url = self.url(&format!("/app/installations/{}/access_tokens", self.app.installation_id));
        let body = TokenRequest { repositories: grant.repository_names(), permissions: &grant.permissions };
        let issued_ms = now_ms();
        let response = self
            .http
            .post(&url)
            .bearer_auth(self.app_jwt()?)
            .header("accept", "application/vnd.github+json")
            .header("x-github-api-version", API_VERSION)
            .json(&body)
            .send()
            .await
            .map_err(|e| GitHubError::Unreachable { url: url.clone(), message: e.to_string() })?;
        let status = response.status();
        let text = response.text().await.map_err(|e| GitHubError::Unreachable { url, message: e.to_string() })?;
        if !status.is_success() {
            let message = serde_json::from_str::<GitHubErrorBody>(&text)
                .map(|b| b.message)
                .unwrap_or_else(|_| text.chars().take(200).collect());
            return Err(GitHubError::Refused { status: status.as_u16(), message });
        }
        let parsed: TokenResponse = serde_json::from_str(&text).map_err(|e| GitHubError::Malformed(e.to_string()))?;
        let expires_ms = parsed.expires_at.timestamp_millis().max(0) as u64;
        if expires_ms <= issued_ms {
            return Err(GitHubError::Malformed(format!("the token expired already ({})", parsed.expires_at)));
        }
        Ok(InstallationToken { token: parsed.token, issued_ms, expires_ms })
    }

    /// Revokes a token that was replaced, so a copy left anywhere stops working now rather
    /// than at its expiry. Best effort: an expired token needs no revoking.
    pub async fn revoke(&self, token: &str) {
        let url = self.url("/installation/token");
        let result = self
            .http
            .delete(&url)
            .bearer_auth(token)
            .header("accept", "application/vnd.github+json")
            .header("x-github-api-version", API_VERSION)
            .send()
            .await;
        match result {
            Ok(r) if r.status().is_success() || r.status() == reqwest::StatusCode::UNAUTHORIZED => {}
            Ok(r) => tracing::warn!(status = %r.status(), "revoking a replaced GitHub token failed"),
            Err(e) => tracing::warn!(error = %e, "revoking a replaced GitHub token failed"),
        }
    }
}
