//! Running a program in a sandbox: the request, the event stream and what a WebSocket client sends.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Invalid;

#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; no shell is involved unless you name one.
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; the user's home if omitted.
    pub cwd: Option<String>,
    /// User name or uid; root if omitted.
    pub user: Option<String>,
    /// Base64 data written to the process's stdin before it is closed (POST /exec only).
    pub stdin: Option<String>,
    /// Kill the process (and its process group) after this many seconds.
    pub timeout_secs: Option<f64>,
}

impl ExecRequest {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(Invalid::new("argv must name a program"));
        }
        for key in self.env.keys() {
            validate_env_name(key)?;
        }
        if let Some(cwd) = &self.cwd {
            validate_guest_path(cwd)?;
        }
        if let Some(t) = self.timeout_secs {
            if !(t > 0.0 && t.is_finite()) {
                return Err(Invalid::new("timeout_secs must be a positive number"));
            }
        }
        Ok(())
    }
}

/// One line of an exec's output stream (NDJSON on POST, a text frame on the WebSocket).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    Started {
        exec_id: String,
        pid: u32,
    },
    /// Base64 bytes.
    Stdout {
        data: String,
    },
    /// Base64 bytes.
    Stderr {
        data: String,
    },
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
    Error {
        message: String,
    },
}

/// What a WebSocket client may send after its first (ExecRequest) message.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecClientMessage {
    Stdin { data: String },
    StdinEof,
    Signal { signal: i32 },
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct SignalRequest {
    pub signal: i32,
}

pub fn validate_env_name(key: &str) -> Result<(), Invalid> {
    let ok = !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Invalid(format!("invalid environment variable name {key:?}: use letters, digits and _")))
    }
}

/// Guest paths must be absolute: there is no working directory to be relative to.
pub fn validate_guest_path(path: &str) -> Result<(), Invalid> {
    if path.is_empty() {
        return Err(Invalid::new("guest path must not be empty"));
    }
    if !path.starts_with('/') {
        return Err(Invalid(format!("guest path must be absolute, got {path:?}")));
    }
    if path.contains('\0') {
        return Err(Invalid::new("guest path must not contain NUL"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_must_be_absolute() {
        assert!(validate_guest_path("").is_err());
        assert!(validate_guest_path("tmp/x").is_err());
        assert!(validate_guest_path("/tmp/x").is_ok());
    }

    #[test]
    fn exec_event_json_is_stable() {
        let e = ExecEvent::Exit { code: Some(3), signal: None, timed_out: false };
        assert_eq!(serde_json::to_string(&e).unwrap(), r#"{"type":"exit","code":3,"signal":null,"timed_out":false}"#);
    }

    #[test]
    fn exec_request_validation() {
        assert!(ExecRequest::default().validate().is_err());
        let ok = ExecRequest { argv: vec!["true".into()], ..Default::default() };
        assert!(ok.validate().is_ok());
        let bad = ExecRequest { timeout_secs: Some(-1.0), ..ok.clone() };
        assert!(bad.validate().is_err());
        let bad = ExecRequest { cwd: Some("rel".into()), ..ok };
        assert!(bad.validate().is_err());
    }
}
