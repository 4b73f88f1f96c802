//! A fake of the GitHub REST API's installation-token endpoints: it verifies the app JWT with
//! the app's public key (RS256, issuer, a lifetime of at most ten minutes) as GitHub does, and
//! issues tokens limited to the repositories and permissions asked for, which expire after a
//! lifetime of the test's choosing and can be revoked.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

/// A GitHub App's key pair, made with openssl in a private directory.
pub struct GitHubApp {
    pub app_id: String,
    pub installation_id: u64,
    dir: tempfile::TempDir,
    public_pem: Vec<u8>,
}

impl GitHubApp {
    pub fn generate(app_id: &str, installation_id: u64) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("torpor-github-app-").tempdir()?;
        let key = dir.path().join("app.pem");
        // PKCS#1, like the keys GitHub hands out.
        let out = Command::new("openssl")
            .args(["genrsa", "-traditional", "-out"])
            .arg(&key)
            .arg("2048")
            .output()
            .context("running openssl (apt-get install openssl)")?;
        if !out.status.success() {
            bail!("openssl genrsa: {}", String::from_utf8_lossy(&out.stderr));
        }
        let public = Command::new("openssl").args(["rsa", "-pubout", "-in"]).arg(&key).output()?;
        if !public.status.success() {
            bail!("openssl rsa -pubout: {}", String::from_utf8_lossy(&public.stderr));
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        Ok(Self { app_id: app_id.into(), installation_id, dir, public_pem: public.stdout })
    }

    pub fn private_key_file(&self) -> PathBuf {
        self.dir.path().join("app.pem")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

#[derive(Debug, Clone)]
struct Issued {
    repositories: Vec<String>,
    permissions: BTreeMap<String, String>,
    expires: SystemTime,
    revoked: bool,
}

struct GitHubState {
    app_id: String,
    installation_id: u64,
    key: jsonwebtoken::DecodingKey,
    repositories: Vec<String>,
    lifetime: Duration,
    tokens: HashMap<String, Issued>,
    refused_jwts: usize,
}

/// Runs until the runtime it was started on ends.
#[derive(Clone)]
pub struct FakeGitHub {
    state: Arc<Mutex<GitHubState>>,
}

#[derive(Deserialize)]
struct AppClaims {
    iat: u64,
    exp: u64,
    iss: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    repositories: Option<Vec<String>>,
    permissions: Option<BTreeMap<String, String>>,
}

fn message(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({"message": text, "documentation_url": "https://docs.github.com/rest"}))).into_response()
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("authorization")?.to_str().ok()?;
    value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("token ")).map(str::to_owned)
}

impl FakeGitHub {
    /// Serves on `listener` (from [`crate::Internet::listen`] or any other), for `app`'s
    /// installation, which holds `repositories`; tokens live `lifetime`.
    pub fn start(
        listener: std::net::TcpListener,
        app: &GitHubApp,
        repositories: &[&str],
        lifetime: Duration,
    ) -> Result<Self> {
        let key = jsonwebtoken::DecodingKey::from_rsa_pem(&app.public_pem)?;
        let state = Arc::new(Mutex::new(GitHubState {
            app_id: app.app_id.clone(),
            installation_id: app.installation_id,
            key,
            repositories: repositories.iter().map(|r| r.to_string()).collect(),
            lifetime,
            tokens: HashMap::new(),
            refused_jwts: 0,
        }));
        let router = Router::new()
            .route("/app/installations/{id}/access_tokens", post(access_token))
            .route("/installation/repositories", get(repositories_of_token))
            .route("/installation/token", delete(revoke))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tokio::spawn(async move { axum::serve(listener, router).await });
        Ok(Self { state })
    }

    /// The repositories `token` opens now; `None` if GitHub would answer "Bad credentials".
    pub fn check(&self, token: &str) -> Option<Vec<String>> {
        let state = self.state.lock().unwrap();
        let issued = state.tokens.get(token)?;
        (!issued.revoked && SystemTime::now() < issued.expires).then(|| issued.repositories.clone())
    }

    pub fn permissions(&self, token: &str) -> Option<BTreeMap<String, String>> {
        self.state.lock().unwrap().tokens.get(token).map(|t| t.permissions.clone())
    }

    /// Lifetime of the tokens issued from now on.
    pub fn set_lifetime(&self, lifetime: Duration) {
        self.state.lock().unwrap().lifetime = lifetime;
    }

    /// Tokens issued so far.
    pub fn issued(&self) -> usize {
        self.state.lock().unwrap().tokens.len()
    }

    pub fn revoked(&self, token: &str) -> bool {
        self.state.lock().unwrap().tokens.get(token).is_some_and(|t| t.revoked)
    }

    /// App JWTs refused so far (a bad signature, issuer or lifetime).
    pub fn refused_jwts(&self) -> usize {
        self.state.lock().unwrap().refused_jwts
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
}

async fn access_token(
    State(state): State<Arc<Mutex<GitHubState>>>,
    UrlPath(installation): UrlPath<u64>,
    headers: HeaderMap,
    body: Option<Json<TokenRequest>>,
) -> Response {
    let mut state = state.lock().unwrap();
    let Some(jwt) = bearer(&headers) else {
        return message(StatusCode::UNAUTHORIZED, "A JSON web token could not be decoded");
    };
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_required_spec_claims(&["exp", "iat", "iss"]);
    validation.validate_aud = false;
    let claims = match jsonwebtoken::decode::<AppClaims>(&jwt, &state.key, &validation) {
        Ok(data) => data.claims,
        Err(_) => {
            state.refused_jwts += 1;
            return message(StatusCode::UNAUTHORIZED, "A JSON web token could not be decoded");
        }
    };
    // GitHub's own rules: the app named as issuer, issued in the past, at most ten minutes.
    if claims.iss != state.app_id || claims.iat > now_secs() + 60 || claims.exp.saturating_sub(claims.iat) > 600 {
        state.refused_jwts += 1;
        return message(
            StatusCode::UNAUTHORIZED,
            "'Expiration time' claim ('exp') is too far in the future, or the issuer is wrong",
        );
    }
    if installation != state.installation_id {
        return message(StatusCode::NOT_FOUND, "Not Found");
    }
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let repositories = match req.repositories {
        Some(asked) => {
            if asked.iter().any(|r| !state.repositories.contains(r)) {
                return message(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "There is at least one repository that does not exist or is not accessible to the parent installation.",
                );
            }
            asked
        }
        None => state.repositories.clone(),
    };
    let permissions = req.permissions.unwrap_or_else(|| BTreeMap::from([("contents".into(), "write".into())]));
    let mut raw = [0u8; 18];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
    let token = format!("ghs_{}", hex::encode(raw));
    let expires = SystemTime::now() + state.lifetime;
    let expires_at: chrono::DateTime<chrono::Utc> = expires.into();
    state.tokens.insert(
        token.clone(),
        Issued { repositories: repositories.clone(), permissions: permissions.clone(), expires, revoked: false },
    );
    let repos: Vec<Value> =
        repositories.iter().map(|r| json!({"name": r, "full_name": format!("torpor-test/{r}")})).collect();
    let body = json!({
        "token": token,
        "expires_at": expires_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "permissions": permissions,
        "repository_selection": "selected",
        "repositories": repos,
    });
    (StatusCode::CREATED, Json(body)).into_response()
}

async fn repositories_of_token(State(state): State<Arc<Mutex<GitHubState>>>, headers: HeaderMap) -> Response {
    let state = state.lock().unwrap();
    let valid = bearer(&headers)
        .and_then(|t| state.tokens.get(&t).cloned())
        .filter(|t| !t.revoked && SystemTime::now() < t.expires);
    match valid {
        Some(t) => {
            let repos: Vec<Value> =
                t.repositories.iter().map(|r| json!({"name": r, "full_name": format!("torpor-test/{r}")})).collect();
            Json(json!({"total_count": repos.len(), "repositories": repos})).into_response()
        }
        None => message(StatusCode::UNAUTHORIZED, "Bad credentials"),
    }
}

async fn revoke(State(state): State<Arc<Mutex<GitHubState>>>, headers: HeaderMap) -> Response {
    let mut state = state.lock().unwrap();
    match bearer(&headers).and_then(|t| state.tokens.get_mut(&t)) {
        Some(t) if !t.revoked && SystemTime::now() < t.expires => {
            t.revoked = true;
            StatusCode::NO_CONTENT.into_response()
        }
        _ => message(StatusCode::UNAUTHORIZED, "Bad credentials"),
    }
}
