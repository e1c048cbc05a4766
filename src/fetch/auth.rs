//! Registry credentials from the files podman and docker users already have, and the insecure
//! (plain HTTP) registries from `registries.conf`.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use serde_json::Value;

/// A username and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// The user name that marks an identity (OAuth2 refresh) token, as docker credential helpers
/// and containers/image spell it.
pub const IDENTITY_TOKEN_USER: &str = "<token>";

impl Credentials {
    /// The identity token these credentials hold instead of a password, if any.
    pub fn identity_token(&self) -> Option<&str> {
        (self.username == IDENTITY_TOKEN_USER).then_some(self.password.as_str())
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Where credentials are looked up, in order: `REGISTRY_AUTH_FILE`,
/// `${XDG_RUNTIME_DIR}/containers/auth.json`, `/run/containers/<uid>/auth.json`,
/// `~/.config/containers/auth.json`, `~/.docker/config.json`.
pub fn default_auth_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE") {
        files.push(PathBuf::from(f));
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        files.push(PathBuf::from(d).join("containers/auth.json"));
    }
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0);
    files.push(PathBuf::from(format!("/run/containers/{uid}/auth.json")));
    if let Some(home) = std::env::var_os("HOME") {
        let home = PathBuf::from(home);
        files.push(home.join(".config/containers/auth.json"));
        files.push(home.join(".docker/config.json"));
    }
    files
}

/// Looks credentials up in auth files and credential helpers.
#[derive(Clone, Debug)]
pub struct CredentialStore {
    files: Vec<PathBuf>,
}

/// Keys under which auth files may list a registry, most specific first.
fn candidate_keys(registry: &str, repository: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let parts: Vec<&str> = repository.split('/').collect();
    for n in (1..=parts.len()).rev() {
        keys.push(format!("{registry}/{}", parts[..n].join("/")));
    }
    keys.push(registry.to_string());
    if registry == "docker.io" {
        keys.extend(
            [
                "index.docker.io",
                "registry-1.docker.io",
                "https://index.docker.io/v1/",
            ]
            .map(String::from),
        );
    }
    keys
}

/// Strips scheme and trailing path from legacy docker keys (`https://host/v1/`).
fn normalize_key(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.strip_suffix("/v1/")
        .or_else(|| k.strip_suffix("/v2/"))
        .or_else(|| k.strip_suffix('/'))
        .unwrap_or(k)
}

fn decode_entry(v: &Value) -> Option<Credentials> {
    if let Some(token) = v
        .get("identitytoken")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        return Some(Credentials {
            username: IDENTITY_TOKEN_USER.into(),
            password: token.into(),
        });
    }
    if let Some(auth) = v
        .get("auth")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()?;
        let s = String::from_utf8(raw).ok()?;
        let (u, p) = s.split_once(':')?;
        return Some(Credentials {
            username: u.into(),
            password: p.into(),
        });
    }
    let u = v.get("username").and_then(Value::as_str)?;
    let p = v.get("password").and_then(Value::as_str)?;
    Some(Credentials {
        username: u.into(),
        password: p.into(),
    })
}

/// Runs `docker-credential-<helper> get` for `server`.
fn run_helper(helper: &str, server: &str) -> Result<Option<Credentials>, String> {
    let program = format!("docker-credential-{helper}");
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {program}: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(server.as_bytes())
        .map_err(|e| format!("writing to {program}: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("running {program}: {e}"))?;
    if !out.status.success() {
        // Helpers answer "credentials not found" with a failure status.
        tracing::debug!(
            "{program} get {server}: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
        return Ok(None);
    }
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{program}: bad output: {e}"))?;
    let (Some(u), Some(p)) = (
        v.get("Username").and_then(Value::as_str),
        v.get("Secret").and_then(Value::as_str),
    ) else {
        return Err(format!("{program}: output lacks Username/Secret"));
    };
    Ok(Some(Credentials {
        username: u.into(),
        password: p.into(),
    }))
}

impl Default for CredentialStore {
    fn default() -> Self {
        CredentialStore::new(default_auth_files())
    }
}

impl CredentialStore {
    pub fn new(files: Vec<PathBuf>) -> Self {
        CredentialStore { files }
    }

    /// Credentials for `registry` (host[:port]) and `repository`, or None for anonymous access.
    /// What podman handed over for the repository comes first, then the files.
    pub fn lookup(&self, registry: &str, repository: &str) -> Result<Option<Credentials>, String> {
        if let Some(c) = super::handover::lookup(registry, repository) {
            return Ok(Some(c));
        }
        let keys = candidate_keys(registry, repository);
        for file in &self.files {
            let Some(doc) = read_json(file)? else {
                continue;
            };
            if let Some(helper) = doc
                .get("credHelpers")
                .and_then(|h| h.get(registry))
                .and_then(Value::as_str)
            {
                if let Some(c) = run_helper(helper, registry)? {
                    return Ok(Some(c));
                }
            }
            if let Some(auths) = doc.get("auths").and_then(Value::as_object) {
                for key in &keys {
                    let found = auths
                        .iter()
                        .find(|(k, _)| normalize_key(k) == normalize_key(key))
                        .and_then(|(_, v)| decode_entry(v));
                    if found.is_some() {
                        return Ok(found);
                    }
                }
            }
            if let Some(store) = doc.get("credsStore").and_then(Value::as_str) {
                if let Some(c) = run_helper(store, registry)? {
                    return Ok(Some(c));
                }
            }
        }
        Ok(None)
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Registries marked `insecure = true` in containers' registries.conf (v2 `[[registry]]` tables
/// and the v1 `[registries.insecure]` list), from the file and its `.d` directory.
pub fn insecure_registries(conf: &Path) -> Vec<String> {
    let mut files = vec![conf.to_path_buf()];
    let dropins = PathBuf::from(format!("{}.d", conf.display()));
    if let Ok(rd) = std::fs::read_dir(&dropins) {
        let mut more: Vec<_> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "conf"))
            .collect();
        more.sort();
        files.extend(more);
    }
    let mut out = Vec::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let doc: toml::Table = match toml::from_str(&text) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("ignoring {}: {e}", f.display());
                continue;
            }
        };
        if let Some(regs) = doc.get("registry").and_then(|v| v.as_array()) {
            for r in regs {
                let insecure = r.get("insecure").and_then(|v| v.as_bool()) == Some(true);
                let loc = r
                    .get("location")
                    .or_else(|| r.get("prefix"))
                    .and_then(|v| v.as_str());
                if let (true, Some(loc)) = (insecure, loc) {
                    out.push(loc.to_string());
                }
            }
        }
        if let Some(list) = doc
            .get("registries")
            .and_then(|r| r.get("insecure"))
            .and_then(|i| i.get("registries"))
            .and_then(|v| v.as_array())
        {
            out.extend(list.iter().filter_map(|v| v.as_str().map(String::from)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_credentials_by_most_specific_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auth.json");
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        std::fs::write(
            &file,
            serde_json::json!({"auths": {
                "reg.example:5000": {"auth": b64("host:pw")},
                "reg.example:5000/team/app": {"auth": b64("scoped:pw2")},
                "https://index.docker.io/v1/": {"auth": b64("hub:pw3")},
            }})
            .to_string(),
        )
        .unwrap();
        let store = CredentialStore::new(vec![dir.path().join("missing.json"), file]);
        let user = |r: &str, repo: &str| store.lookup(r, repo).unwrap().map(|c| c.username);
        assert_eq!(
            user("reg.example:5000", "team/app").as_deref(),
            Some("scoped")
        );
        assert_eq!(user("reg.example:5000", "other").as_deref(), Some("host"));
        assert_eq!(user("docker.io", "library/alpine").as_deref(), Some("hub"));
        assert_eq!(user("elsewhere.io", "x"), None);
    }

    #[test]
    fn reads_insecure_registries() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("registries.conf");
        std::fs::write(&conf, "[registries.insecure]\nregistries = ['old:5000']\n").unwrap();
        std::fs::create_dir(dir.path().join("registries.conf.d")).unwrap();
        std::fs::write(
            dir.path().join("registries.conf.d/50-local.conf"),
            "[[registry]]\nlocation = \"127.0.0.1:5000\"\ninsecure = true\n[[registry]]\nlocation = \"secure.io\"\n",
        )
        .unwrap();
        assert_eq!(
            insecure_registries(&conf),
            vec!["old:5000", "127.0.0.1:5000"]
        );
    }
}
