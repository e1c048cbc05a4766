//! The configuration file: which fetchers (in order) and which cache, with per-backend options.
//!
//! Sources, later ones winning: built-in defaults, `/etc/soci-store/config.toml` (a user's
//! `$XDG_CONFIG_HOME/soci-store/config.toml`, see [`crate::paths`]; or `--config`), and
//! environment variables `SOCI_STORE_<KEY>` with `__` between levels (e.g.
//! `SOCI_STORE_CACHE__TYPE=memory`). Default paths are the system's for root and the user's XDG
//! directories for everyone else.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize};

/// Where the configuration is read from unless `--config` says otherwise:
/// `/etc/soci-store/config.toml`, or `$XDG_CONFIG_HOME/soci-store/config.toml` for a user.
pub fn default_config_path() -> PathBuf {
    crate::paths::config_file()
}

/// A backend selected by `type`, with its own options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendConfig {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(flatten)]
    pub options: toml::Table,
}

impl BackendConfig {
    pub fn new(kind: &str) -> Self {
        BackendConfig {
            kind: kind.to_string(),
            options: toml::Table::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        self.options.insert(key.to_string(), value.into());
        self
    }
}

/// The effective configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Tried in order; a blob missing from one is looked up in the next.
    #[serde(default = "default_fetchers")]
    pub fetchers: Vec<BackendConfig>,
    /// Where verified span bytes are kept.
    #[serde(default = "default_cache")]
    pub cache: BackendConfig,
    /// The local artifact store: SOCI indexes and zTOCs built or fetched.
    #[serde(default = "default_artifacts")]
    pub artifacts: PathBuf,
    /// `host:port` for the store's Prometheus endpoint; off when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_address: Option<String>,
    /// Where `serve` keeps what a restarted daemon needs to take over its mount (a handoff
    /// socket and the inode journal). A tmpfs is right: none of it outlives a reboot.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Where `serve` keeps decompressed copies of files whose bytes are all local: reads of them
    /// never inflate again, and the kernel reads them directly (FUSE passthrough).
    #[serde(default = "default_local_files")]
    pub local_files: PathBuf,
    /// Bound on the decompressed copies (least recently used files go first); 0 keeps none.
    #[serde(default = "default_local_files_bytes", deserialize_with = "de_size")]
    pub local_files_max_bytes: u64,
}

fn default_local_files() -> PathBuf {
    crate::paths::data("files")
}

fn default_local_files_bytes() -> u64 {
    20 << 30
}

fn default_state_dir() -> PathBuf {
    crate::paths::runtime()
}

fn default_artifacts() -> PathBuf {
    crate::paths::data("artifacts")
}

fn default_fetchers() -> Vec<BackendConfig> {
    vec![BackendConfig::new("registry")]
}

/// `tiered`: 512 MiB in memory over 20 GiB in /var/cache/soci-store (a user's
/// `$XDG_CACHE_HOME/soci-store`; the backend's defaults for options not given).
fn default_cache() -> BackendConfig {
    BackendConfig::new("tiered")
}

impl Default for Config {
    fn default() -> Self {
        Config {
            fetchers: default_fetchers(),
            cache: default_cache(),
            artifacts: default_artifacts(),
            metrics_address: None,
            state_dir: default_state_dir(),
            local_files: default_local_files(),
            local_files_max_bytes: default_local_files_bytes(),
        }
    }
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    Missing(PathBuf),
    #[error("configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads defaults, then the file (`path`, or the default path if it exists), then the
    /// environment. An explicit path that does not exist is an error.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        match path {
            Some(p) if !p.exists() => return Err(ConfigError::Missing(p.to_path_buf())),
            Some(p) => fig = fig.merge(Toml::file_exact(p)),
            None => {
                let default = default_config_path();
                if default.exists() {
                    fig = fig.merge(Toml::file_exact(default))
                }
            }
        }
        fig = fig.merge(Env::prefixed("SOCI_STORE_").ignore(&["log"]).split("__"));
        let config: Config = fig.extract().map_err(|e| {
            let msgs: Vec<String> = e.into_iter().map(|e| e.to_string()).collect();
            ConfigError::Invalid(msgs.join("; "))
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what the types alone do not: paths that are not empty, a `host:port` metrics
    /// address. Backend options are checked by the backends (`BackendRegistry`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        for (key, path) in [
            ("artifacts", &self.artifacts),
            ("state_dir", &self.state_dir),
            ("local_files", &self.local_files),
        ] {
            if path.as_os_str().is_empty() {
                return invalid(format!("{key}: must be a directory, not empty"));
            }
        }
        if let Some(addr) = &self.metrics_address {
            let port = addr
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(_))) if !host.is_empty()) {
                return invalid(format!(
                    "metrics_address: {addr:?} is not host:port (e.g. \"127.0.0.1:9300\")"
                ));
            }
        }
        Ok(())
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the config always serializes")
    }
}

/// A byte size in config: an integer, or a string such as `"512MiB"`.
pub fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        N(u64),
        S(String),
    }
    match Size::deserialize(d)? {
        Size::N(n) => Ok(n),
        Size::S(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

/// Parses sizes such as `4194304`, `4MiB`, `4M`, `512k`, `1GiB` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size too large: {s:?}"))
}
