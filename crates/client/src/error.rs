/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the Torpor daemon at {base}: is `torpor server` running?")]
    Unreachable {
        base: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("request to {base} failed")]
    Transport {
        base: String,
        #[source]
        source: reqwest::Error,
    },
    /// The daemon answered with an error: its status, code and explanation.
    #[error("{message} ({status})")]
    Api { status: u16, code: String, message: String },
    #[error("decoding {what}")]
    Decode {
        what: &'static str,
        #[source]
        source: reqwest::Error,
    },
    #[error("{0}")]
    Protocol(String),
    #[error("reading the API key from {}", path.display())]
    ApiKeyFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no API key: set TORPOR_API_KEY or --api-key-file, or run as a user who can read {} (it is created when `torpor server` first starts)", path.display())]
    NoApiKey {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn transport(base: &str, source: reqwest::Error) -> Self {
        if source.is_connect() {
            Self::Unreachable { base: base.to_owned(), source }
        } else {
            Self::Transport { base: base.to_owned(), source }
        }
    }

    /// An error answer: the daemon's `{"error": {"code", "message"}}`, or the text as it came.
    pub(crate) fn from_answer(status: u16, body: &str) -> Self {
        match serde_json::from_str::<torpor_api::ErrorBody>(body) {
            Ok(b) => Self::Api { status, code: b.error.code, message: b.error.message },
            Err(_) => Self::Api { status, code: String::new(), message: body.trim().to_owned() },
        }
    }

    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}
