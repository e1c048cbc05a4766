//! Named factories for fetchers and caches. Built-ins register themselves; a backend crate adds
//! its own with [`BackendRegistry::register_fetcher`] / [`BackendRegistry::register_cache`], and a
//! config file selects backends by `type`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::cache::{DiskCache, MemoryCache, SpanCache, TieredCache};
use crate::config::{de_size, BackendConfig, Config, ConfigError};
use crate::fetch::local::LocalFetcher;
use crate::fetch::registry::{RegistryClient, RegistryFetcher, RegistryOptions};
use crate::fetch::s3::{S3Fetcher, S3Options};
use crate::fetch::{Fetcher, FetcherChain};
use crate::spans::SpanStore;

/// A backend's options, as written in its config table (without `type`).
pub type Options = toml::Table;
/// Makes a backend of kind `T` from its options.
pub type Factory<T> = Box<dyn Fn(&Options) -> anyhow::Result<Arc<T>> + Send + Sync>;
/// Makes a fetcher from its options.
pub type FetcherFactory = Factory<dyn Fetcher>;
/// Makes a cache from its options.
pub type CacheFactory = Factory<dyn SpanCache>;

/// Parses a backend's options into its typed struct (use `deny_unknown_fields` there, so a
/// misspelt key is an error naming it).
pub fn parse_options<T: DeserializeOwned>(opts: &Options) -> anyhow::Result<T> {
    Ok(toml::Value::Table(opts.clone()).try_into::<T>()?)
}

/// The client of commands that write to registries or read whole images from them (`convert`,
/// `create`, `mirror`), with the options of the first configured `registry` fetcher (insecure
/// registries, auth files), else the defaults. What the store and the other commands read goes
/// through the fetcher chain instead.
pub fn registry_client(config: &Config) -> anyhow::Result<Arc<RegistryClient>> {
    let opts = match config.fetchers.iter().find(|f| f.kind == "registry") {
        Some(b) => parse_options(&b.options)?,
        None => RegistryOptions::default(),
    };
    Ok(Arc::new(RegistryClient::new(opts)?))
}

/// Checks a backend's options without making it (no directories created, nothing opened).
type OptionsCheck = fn(&Options) -> anyhow::Result<()>;

/// The known backends by name.
#[derive(Default)]
pub struct BackendRegistry {
    fetchers: BTreeMap<String, FetcherFactory>,
    caches: BTreeMap<String, CacheFactory>,
    /// Side-effect-free option checks of the built-in caches (dropped when a factory of the
    /// same name is registered over one).
    cache_checks: BTreeMap<String, OptionsCheck>,
}

impl std::fmt::Debug for BackendRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendRegistry")
            .field("fetchers", &self.fetchers.keys().collect::<Vec<_>>())
            .field("caches", &self.caches.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalOptions {
    path: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryOptions {
    #[serde(deserialize_with = "de_size", default = "default_memory_bytes")]
    max_bytes: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskOptions {
    #[serde(default = "default_cache_path")]
    path: PathBuf,
    #[serde(deserialize_with = "de_size", default = "default_disk_bytes")]
    max_bytes: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TieredOptions {
    #[serde(deserialize_with = "de_size", default = "default_memory_bytes")]
    memory_bytes: u64,
    #[serde(default = "default_cache_path")]
    path: PathBuf,
    #[serde(deserialize_with = "de_size", default = "default_disk_bytes")]
    disk_bytes: u64,
}

// Cache defaults live with the backends, not in the config's defaults: merged there, they would
// be given to whatever cache type the user picks (a `memory` cache with `disk_bytes`).
fn default_memory_bytes() -> u64 {
    512 << 20
}

fn default_disk_bytes() -> u64 {
    20 << 30
}

fn default_cache_path() -> PathBuf {
    crate::paths::cache()
}

impl BackendRegistry {
    /// No backends at all.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The built-in backends: fetchers `registry`, `s3`, `local`; caches `memory`, `disk`,
    /// `tiered`.
    pub fn with_builtins() -> Self {
        let mut r = Self::empty();
        r.register_fetcher("registry", |o| {
            let opts: RegistryOptions = parse_options(o)?;
            Ok(Arc::new(RegistryFetcher::new(opts)?))
        });
        r.register_fetcher("s3", |o| {
            let opts: S3Options = parse_options(o)?;
            Ok(Arc::new(S3Fetcher::new(&opts)?))
        });
        r.register_fetcher("local", |o| {
            let opts: LocalOptions = parse_options(o)?;
            Ok(Arc::new(LocalFetcher::new(opts.path)?))
        });
        fn check<T: DeserializeOwned>(o: &Options) -> anyhow::Result<()> {
            parse_options::<T>(o).map(drop)
        }
        r.register_cache("memory", |o| {
            let opts: MemoryOptions = parse_options(o)?;
            Ok(Arc::new(MemoryCache::new(opts.max_bytes)))
        });
        r.register_cache("disk", |o| {
            let opts: DiskOptions = parse_options(o)?;
            Ok(Arc::new(DiskCache::open(&opts.path, opts.max_bytes)?))
        });
        r.register_cache("tiered", |o| {
            let opts: TieredOptions = parse_options(o)?;
            Ok(Arc::new(TieredCache::new(
                MemoryCache::new(opts.memory_bytes),
                DiskCache::open(&opts.path, opts.disk_bytes)?,
            )))
        });
        r.cache_checks
            .insert("memory".into(), check::<MemoryOptions>);
        r.cache_checks.insert("disk".into(), check::<DiskOptions>);
        r.cache_checks
            .insert("tiered".into(), check::<TieredOptions>);
        r
    }

    pub fn register_fetcher(
        &mut self,
        name: &str,
        factory: impl Fn(&Options) -> anyhow::Result<Arc<dyn Fetcher>> + Send + Sync + 'static,
    ) {
        self.fetchers.insert(name.to_string(), Box::new(factory));
    }

    pub fn register_cache(
        &mut self,
        name: &str,
        factory: impl Fn(&Options) -> anyhow::Result<Arc<dyn SpanCache>> + Send + Sync + 'static,
    ) {
        self.caches.insert(name.to_string(), Box::new(factory));
        self.cache_checks.remove(name);
    }

    pub fn fetcher_types(&self) -> Vec<&str> {
        self.fetchers.keys().map(String::as_str).collect()
    }

    pub fn cache_types(&self) -> Vec<&str> {
        self.caches.keys().map(String::as_str).collect()
    }

    fn make<T: ?Sized>(
        table: &BTreeMap<String, Factory<T>>,
        what: &str,
        at: &str,
        b: &BackendConfig,
    ) -> Result<Arc<T>, ConfigError> {
        let factory = table.get(&b.kind).ok_or_else(|| {
            let known: Vec<&str> = table.keys().map(String::as_str).collect();
            ConfigError::Invalid(format!(
                "{at}: unknown {what} type {:?} (known types: {})",
                b.kind,
                known.join(", ")
            ))
        })?;
        factory(&b.options)
            .map_err(|e| ConfigError::Invalid(format!("{at} (type {:?}): {e:#}", b.kind)))
    }

    /// The configured fetchers, in order.
    pub fn build_fetchers(&self, config: &Config) -> Result<FetcherChain, ConfigError> {
        let mut out = Vec::new();
        for (i, b) in config.fetchers.iter().enumerate() {
            out.push(Self::make(
                &self.fetchers,
                "fetcher",
                &format!("fetchers[{i}]"),
                b,
            )?);
        }
        if out.is_empty() {
            return Err(ConfigError::Invalid(
                "fetchers: at least one fetcher is required".into(),
            ));
        }
        Ok(FetcherChain::new(out))
    }

    /// Checks the `[cache]` table without making the cache: its type is known and, for the
    /// built-in caches, its options parse (a plugin's cache options are checked when it is made).
    pub fn check_cache(&self, config: &Config) -> Result<(), ConfigError> {
        let b = &config.cache;
        if !self.caches.contains_key(&b.kind) {
            return Err(ConfigError::Invalid(format!(
                "cache: unknown cache type {:?} (known types: {})",
                b.kind,
                self.cache_types().join(", ")
            )));
        }
        match self.cache_checks.get(&b.kind) {
            Some(check) => check(&b.options)
                .map_err(|e| ConfigError::Invalid(format!("cache (type {:?}): {e:#}", b.kind))),
            None => Ok(()),
        }
    }

    /// The configured cache.
    pub fn build_cache(&self, config: &Config) -> Result<Arc<dyn SpanCache>, ConfigError> {
        Self::make(&self.caches, "cache", "cache", &config.cache)
    }

    /// Fetchers and cache assembled into the span stack.
    pub fn build_span_store(&self, config: &Config) -> Result<SpanStore, ConfigError> {
        Ok(SpanStore::new(
            self.build_fetchers(config)?,
            self.build_cache(config)?,
        ))
    }
}
