//! Device tokens: the identity a sandbox holds. A JWT signed by the daemon (EdDSA, a key that
//! never leaves the host), naming the sandbox, its owner and an audience, valid for at most an
//! hour. The guest calls back into the control plane with it, and the API accepts it for that
//! sandbox's own resources only. Tokens are re-issued on every resume and before they expire
//! while a sandbox runs, so a snapshot never holds a credential that outlives it by much.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

pub const ISSUER: &str = "torpor";
pub const AUDIENCE: &str = "torpor-device";
/// Longest lifetime a device token may have.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
const KEY_FILE: &str = "device-token-key.der";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("device token signing key {path}: {message}")]
    Key { path: String, message: String },
    #[error("signing a device token: {0}")]
    Sign(String),
    #[error("invalid device token: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The sandbox id.
    pub sub: String,
    pub owner: String,
    pub aud: String,
    pub iss: String,
    pub iat: u64,
    pub exp: u64,
    /// Unique per token.
    pub jti: String,
}

pub struct DeviceTokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    jwk: Jwk,
    kid: String,
    ttl: Duration,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl DeviceTokens {
    /// Loads the signing key from `data_dir`, creating it (0600) on first start.
    pub fn load_or_create(data_dir: &Path, ttl: Duration) -> Result<Self, IdentityError> {
        let path = data_dir.join(KEY_FILE);
        let key_err = |message: String| IdentityError::Key { path: path.display().to_string(), message };
        let der = match std::fs::read(&path) {
            Ok(der) => der,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
                let der = key.to_pkcs8_der().map_err(|e| key_err(e.to_string()))?.as_bytes().to_vec();
                crate::files::write_private(&path, &der).map_err(|e| key_err(e.to_string()))?;
                der
            }
            Err(e) => return Err(key_err(e.to_string())),
        };
        let signing = ed25519_dalek::SigningKey::from_pkcs8_der(&der).map_err(|e| key_err(e.to_string()))?;
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signing.verifying_key().as_bytes());
        // The key id: a digest of the public key, stable across restarts.
        let kid = hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(x.as_bytes())[..8]);
        let jwk: Jwk = serde_json::from_value(serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "x": x, "alg": "EdDSA", "use": "sig", "kid": kid,
        }))
        .map_err(|e| key_err(e.to_string()))?;
        let encoding = EncodingKey::from_ed_der(&der);
        let decoding = DecodingKey::from_ed_components(&x).map_err(|e| key_err(e.to_string()))?;
        Ok(Self { encoding, decoding, jwk, kid, ttl: ttl.min(MAX_TTL) })
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A fresh token for sandbox `id`; returns it and its expiry (seconds since the epoch).
    pub fn issue(&self, id: &str, owner: &str) -> Result<(String, u64), IdentityError> {
        let iat = now_secs();
        let exp = iat + self.ttl.as_secs().max(1);
        let mut jti = [0u8; 12];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut jti);
        let claims = Claims {
            sub: id.to_owned(),
            owner: owner.to_owned(),
            aud: AUDIENCE.into(),
            iss: ISSUER.into(),
            iat,
            exp,
            jti: hex::encode(jti),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        let token =
            jsonwebtoken::encode(&header, &claims, &self.encoding).map_err(|e| IdentityError::Sign(e.to_string()))?;
        Ok((token, exp))
    }

    /// Checks signature, issuer, audience and expiry (no leeway: an expired token is refused).
    pub fn verify(&self, token: &str) -> Result<Claims, IdentityError> {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&[AUDIENCE]);
        validation.set_issuer(&[ISSUER]);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map(|data| data.claims)
            .map_err(|e| IdentityError::Invalid(e.to_string()))
    }

    /// The public key, for anyone who wants to check a device token themselves.
    pub fn jwks(&self) -> JwkSet {
        JwkSet { keys: vec![self.jwk.clone()] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = DeviceTokens::load_or_create(dir.path(), Duration::from_secs(60)).unwrap();
        let (token, exp) = tokens.issue("sb-abc", "local").unwrap();
        let claims = tokens.verify(&token).unwrap();
        assert_eq!((claims.sub.as_str(), claims.exp, claims.aud.as_str()), ("sb-abc", exp, AUDIENCE));
        // The key survives a restart; a different key does not accept the token.
        let again = DeviceTokens::load_or_create(dir.path(), Duration::from_secs(60)).unwrap();
        assert!(again.verify(&token).is_ok());
        let other = DeviceTokens::load_or_create(tempfile::tempdir().unwrap().path(), Duration::from_secs(60)).unwrap();
        assert!(other.verify(&token).is_err());
        // Tampering breaks it.
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = parts[1].chars().rev().collect();
        assert!(tokens.verify(&parts.join(".")).is_err());
        let jwks = serde_json::to_value(tokens.jwks()).unwrap();
        assert_eq!(jwks["keys"][0]["crv"], "Ed25519");
        assert!(jwks["keys"][0].get("d").is_none(), "the JWKS must not carry the private key");
    }

    #[test]
    fn lifetimes_are_capped_at_an_hour() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = DeviceTokens::load_or_create(dir.path(), Duration::from_secs(86_400)).unwrap();
        assert_eq!(tokens.ttl(), MAX_TTL);
    }
}
