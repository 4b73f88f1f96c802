//! Daemon configuration: embedded defaults, optionally overridden by a TOML file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use torpor_api::ModelFlavour;
use torpor_engine::EngineConfig;
use torpor_net::AddressPool;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the REST API.
    pub listen: SocketAddr,
    /// Database, API key and per-sandbox files. `$TORPOR_HOME`, else `/var/lib/torpor`.
    pub data_dir: PathBuf,
    /// Built guest images. `$TORPOR_IMAGES`, else `/var/cache/torpor/images`.
    pub image_dir: PathBuf,
    /// The engine's settings (top-level keys of the file, named by `EngineConfig::KEYS`).
    #[serde(skip)]
    pub engine: EngineConfig,
    /// Host-side addresses, one /30 per sandbox.
    pub address_pool: String,
    /// How long a new sandbox may take to answer its first health check.
    pub boot_timeout_secs: u64,
    /// Largest file `cp` moves in either direction.
    pub max_file_bytes: u64,
    /// Appended to every guest kernel command line.
    pub kernel_args_extra: String,
    pub default_vcpus: u32,
    pub default_memory_mib: u32,
    pub max_vcpus: u32,
    pub min_memory_mib: u32,
    pub max_memory_mib: u32,
    /// Idle seconds before a sandbox pauses when its create request does not say (0 = never).
    pub default_idle_timeout_secs: u64,
    /// Name servers the sandboxes' resolver forwards allowed names to (IPv4 or IPv6 addresses,
    /// port 53). Empty: the host's own, from /etc/resolv.conf.
    pub dns_upstreams: Vec<std::net::IpAddr>,
    /// Each sandbox's VM runs as uid (and gid) `vm_uid_base + its address slot`; the group
    /// `vm_uid_base` may read templates. Pick a range no account on the host uses.
    pub vm_uid_base: u32,
    /// Memory a VM process may use beyond its guest's RAM for the VMM itself (its heap, device
    /// emulation, binaries, page tables). Its cgroup's limit is RAM + this (+ what the engine
    /// adds, e.g. a code cache under software emulation).
    pub vmm_overhead_mib: u32,
    /// Most processes and threads in one VM's cgroup.
    pub vm_pids_max: u64,
    /// Disk I/O weight of each VM (1-1000; honoured where the I/O scheduler supports weights).
    pub vm_io_weight: u16,
    /// Disk quota of a sandbox whose create request does not say, and the largest allowed.
    pub default_disk_mib: u32,
    pub max_disk_mib: u32,
    /// Serve the API on a non-loopback address without TLS. Off: such a `listen` is refused
    /// (put a TLS-terminating proxy in front, or set this knowingly).
    pub allow_insecure_listen: bool,
    /// Lifetime of the device tokens sandboxes hold (at most 3600); they are re-issued on every
    /// resume and before they expire.
    pub device_token_ttl_secs: u64,
    /// Static secrets sandboxes may be given by name (`[secrets.NAME] file = "…"`), for what has
    /// no token exchange. Each file must be readable by root only (mode 0600 or stricter); it is
    /// read at every delivery, so rotating it reaches sandboxes on their next resume.
    pub secrets: std::collections::BTreeMap<String, SecretSource>,
    /// A GitHub App whose installation tokens sandboxes may receive (`[github]`).
    pub github: Option<GitHubApp>,
    /// Model APIs the proxy forwards to, by flavour: `[models.anthropic]`, `[models.openai]`.
    pub models: std::collections::BTreeMap<ModelFlavour, ModelUpstream>,
    /// Tokens (input + output) a sandbox may spend through the model proxy when neither its
    /// create request nor its template says; 0 = no limit.
    pub default_model_token_budget: u64,
    /// Longest a relayed message's agent may take to answer; it is then cancelled and the
    /// conversation gets an error reply (its next message is not held up).
    pub agent_timeout_secs: u64,
    /// Telegram Bot API root (replies of Telegram channels).
    pub telegram_api_url: String,
    /// Slack Web API root (replies of Slack channels).
    pub slack_api_url: String,
    /// The package registries a template's network policy means by `@registries` (the `coder`
    /// template allows them): names as in `allow_domains`.
    pub package_registries: Vec<String>,
}

/// A GitHub App installed on the account whose repositories sandboxes work on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitHubApp {
    /// The app's id (or client id): the issuer of the JWTs the daemon signs.
    pub app_id: String,
    pub installation_id: u64,
    /// The app's private key (PEM), root-only like every secret.
    pub private_key_file: PathBuf,
    /// REST API root; `https://HOST/api/v3` for GitHub Enterprise Server.
    #[serde(default = "default_github_api")]
    pub api_url: String,
    /// The host git clones from, for which the guest's credential helper answers; derived from
    /// `api_url` if omitted (`api.github.com` → `github.com`).
    pub git_host: Option<String>,
}

fn default_github_api() -> String {
    "https://api.github.com".into()
}

impl GitHubApp {
    pub fn git_host(&self) -> String {
        if let Some(host) = &self.git_host {
            return host.clone();
        }
        let host = reqwest::Url::parse(&self.api_url).ok().and_then(|u| u.host_str().map(str::to_owned));
        let host = host.unwrap_or_default();
        host.strip_prefix("api.").map(str::to_owned).unwrap_or(host)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelUpstream {
    /// Root of the upstream API, without `/v1` (`https://api.anthropic.com`).
    pub base_url: String,
    /// The real API key, root-only; it never leaves the host.
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    pub file: PathBuf,
}

pub fn default_data_dir() -> PathBuf {
    std::env::var_os("TORPOR_HOME").map(PathBuf::from).unwrap_or_else(|| "/var/lib/torpor".into())
}

pub fn default_image_dir() -> PathBuf {
    std::env::var_os("TORPOR_IMAGES").map(PathBuf::from).unwrap_or_else(|| "/var/cache/torpor/images".into())
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            data_dir: default_data_dir(),
            image_dir: default_image_dir(),
            engine: EngineConfig::default(),
            address_pool: "10.240.0.0/16".into(),
            boot_timeout_secs: 120,
            max_file_bytes: 1 << 30,
            kernel_args_extra: String::new(),
            default_vcpus: 1,
            default_memory_mib: 512,
            max_vcpus: 16,
            min_memory_mib: 128,
            max_memory_mib: 65536,
            default_idle_timeout_secs: 300,
            dns_upstreams: Vec::new(),
            vm_uid_base: 1_000_000_000,
            vmm_overhead_mib: 128,
            vm_pids_max: 512,
            vm_io_weight: 100,
            default_disk_mib: 4096,
            max_disk_mib: 65536,
            allow_insecure_listen: false,
            device_token_ttl_secs: 3600,
            secrets: Default::default(),
            github: None,
            models: Default::default(),
            default_model_token_budget: 0,
            agent_timeout_secs: 1800,
            telegram_api_url: "https://api.telegram.org".into(),
            slack_api_url: "https://slack.com/api".into(),
            package_registries: [
                "deb.debian.org",
                "security.debian.org",
                "registry.npmjs.org",
                "pypi.org",
                "files.pythonhosted.org",
                "crates.io",
                "index.crates.io",
                "static.crates.io",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// A secret's name must be an environment variable name, its file private to root.
fn secret_source_ok(name: &str, source: &SecretSource) -> Result<(), String> {
    if name.is_empty()
        || name.starts_with(|c: char| c.is_ascii_digit())
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(format!("secret name {name:?} must be an environment variable name (letters, digits, _)"));
    }
    private_file_ok(&format!("secret {name}"), &source.file)
}

/// Files holding secrets must belong to root and be readable by nobody else.
fn private_file_ok(what: &str, path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{what}: {}: {e}", path.display()))?;
    if meta.mode() & 0o077 != 0 || meta.uid() != 0 {
        return Err(format!(
            "{what}: {} must belong to root with mode 0600 (it is {:o}, uid {}); run chmod 600 on it",
            path.display(),
            meta.mode() & 0o777,
            meta.uid()
        ));
    }
    Ok(())
}

/// Reads a root-only file holding a secret, without its trailing newline.
pub fn read_private(what: &str, path: &Path) -> Result<String, String> {
    private_file_ok(what, path)?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {what}: {e}"))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

impl Config {
    /// The current value of secret `name` (trailing newline removed).
    pub fn read_secret(&self, name: &str) -> Result<String, String> {
        let source = self.secrets.get(name).ok_or_else(|| format!("no secret {name:?} is configured"))?;
        secret_source_ok(name, source)?;
        read_private(&format!("secret {name}"), &source.file)
    }

    /// Defaults, overridden by `path` if given, else by `<data_dir>/config.toml` if it exists.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let implicit = default_data_dir().join("config.toml");
        let path = match path {
            Some(p) => Some(p.to_path_buf()),
            None => implicit.is_file().then_some(implicit),
        };
        let config = match path {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                Self::parse(&text).map_err(|message| ConfigError::Parse { path, message })?
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// The file's text: the engine's keys go to the engine's settings, the rest here.
    fn parse(text: &str) -> Result<Self, String> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut engine = toml::Table::new();
        for key in EngineConfig::KEYS {
            if let Some(value) = table.remove(*key) {
                engine.insert((*key).to_owned(), value);
            }
        }
        let mut config: Config = table.try_into().map_err(|e: toml::de::Error| e.to_string())?;
        config.engine = engine.try_into().map_err(|e: toml::de::Error| e.to_string())?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.pool()?;
        let invalid = |key, message: &str| Err(ConfigError::Invalid { key, message: message.to_owned() });
        if self.max_vcpus == 0 {
            return invalid("max_vcpus", "must be at least 1");
        }
        if self.min_memory_mib < 64 || self.min_memory_mib > self.max_memory_mib {
            return invalid("min_memory_mib", "must be at least 64 and at most max_memory_mib");
        }
        if self.default_vcpus == 0 || self.default_vcpus > self.max_vcpus {
            return invalid("default_vcpus", "must be between 1 and max_vcpus");
        }
        if !(self.min_memory_mib..=self.max_memory_mib).contains(&self.default_memory_mib) {
            return invalid("default_memory_mib", "must be between min_memory_mib and max_memory_mib");
        }
        if self.boot_timeout_secs == 0 {
            return invalid("boot_timeout_secs", "must be at least 1");
        }
        if self.vm_uid_base < 65536 || self.vm_uid_base.checked_add(self.pool()?.capacity() + 1).is_none() {
            return invalid("vm_uid_base", "must be at least 65536 and leave room for one uid per address slot");
        }
        for (name, source) in &self.secrets {
            secret_source_ok(name, source).map_err(|message| ConfigError::Invalid { key: "secrets", message })?;
        }
        if let Some(app) = &self.github {
            let invalid = |message: String| ConfigError::Invalid { key: "github", message };
            private_file_ok("github.private_key_file", &app.private_key_file).map_err(invalid)?;
            let url = reqwest::Url::parse(&app.api_url).map_err(|e| invalid(format!("api_url: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(invalid(format!("api_url {:?} must be an http(s) URL", app.api_url)));
            }
            if app.app_id.is_empty() {
                return Err(invalid("app_id must not be empty".into()));
            }
        }
        for (flavour, upstream) in &self.models {
            let invalid = |message: String| ConfigError::Invalid { key: "models", message };
            let what = format!("models.{}.key_file", flavour.as_str());
            private_file_ok(&what, &upstream.key_file).map_err(invalid)?;
            let url = reqwest::Url::parse(&upstream.base_url)
                .map_err(|e| invalid(format!("models.{}.base_url: {e}", flavour.as_str())))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(invalid(format!("models.{}.base_url must be an http(s) URL", flavour.as_str())));
            }
        }
        if !(1..=3600).contains(&self.device_token_ttl_secs) {
            return invalid("device_token_ttl_secs", "must be between 1 and 3600");
        }
        if self.agent_timeout_secs == 0 {
            return invalid("agent_timeout_secs", "must be at least 1");
        }
        if !(1..=1000).contains(&self.vm_io_weight) {
            return invalid("vm_io_weight", "must be between 1 and 1000");
        }
        if let Err((key, message)) = self.engine.validate() {
            return Err(ConfigError::Invalid { key, message });
        }
        if self.vmm_overhead_mib < 64 {
            return invalid("vmm_overhead_mib", "must be at least 64 (the VMM's own memory)");
        }
        if self.vm_pids_max < 16 {
            return invalid("vm_pids_max", "must be at least 16 (the VMM's own threads)");
        }
        if self.default_disk_mib < 64 || self.default_disk_mib > self.max_disk_mib {
            return invalid("default_disk_mib", "must be at least 64 and at most max_disk_mib");
        }
        if !self.listen.ip().is_loopback() && !self.allow_insecure_listen {
            return invalid(
                "listen",
                "is not a loopback address: the API would be served without TLS to the network. Keep it on \
                 127.0.0.1 behind a TLS-terminating proxy, or set allow_insecure_listen = true knowingly",
            );
        }
        Ok(())
    }

    pub fn pool(&self) -> Result<AddressPool, ConfigError> {
        self.address_pool
            .parse()
            .map_err(|e: torpor_net::PoolError| ConfigError::Invalid { key: "address_pool", message: e.to_string() })
    }

    pub fn sandboxes_dir(&self) -> PathBuf {
        self.data_dir.join("sandboxes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:9999\"\nmax_vcpus = 4\n").unwrap();
        let c = Config::load(Some(&path)).unwrap();
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.max_vcpus, 4);
        assert_eq!(c.default_memory_mib, 512);
        std::fs::write(&path, "lisen = \"x\"\n").unwrap();
        assert!(matches!(Config::load(Some(&path)), Err(ConfigError::Parse { .. })));
    }

    /// The engine's keys stay where existing files have them, and are the engine's to check.
    #[test]
    fn engine_keys_reach_the_engine() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let engine = EngineConfig::KEYS.join(" ");
        assert!(engine.contains("accel") && engine.contains("tcg_code_cache_mib"), "{engine}");
        std::fs::write(&path, "accel = \"tcg\"\ntcg_code_cache_mib = 64\nmax_vcpus = 4\n").unwrap();
        let c = Config::load(Some(&path)).unwrap();
        assert_eq!((c.engine.tcg_code_cache_mib, c.max_vcpus), (64, 4));
        assert_eq!(c.engine.accel, torpor_engine::AccelPreference::Tcg);
        std::fs::write(&path, "tcg_code_cache_mib = 4\n").unwrap();
        let e = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(e.contains("tcg_code_cache_mib"), "{e}");
        std::fs::write(&path, "accel = \"fast\"\n").unwrap();
        assert!(matches!(Config::load(Some(&path)), Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn inconsistent_limits_are_refused() {
        let c = Config { default_vcpus: 8, max_vcpus: 4, ..Config::default() };
        assert!(c.validate().is_err());
        let c = Config { address_pool: "10.0.0.0/31".into(), ..Config::default() };
        assert!(c.validate().is_err());
    }
}
