//! Credentials podman hands the store for a pull: registries.conf's
//! `additional-layer-store-auth-helper` (podman >= 5.2) runs a helper with a JSON object on its
//! stdin, `{"REGISTRY/REPOSITORY[:TAG|@DIGEST]": {"username", "password", "identityToken"}}`,
//! every time podman reads an image from a registry; `soci-store-auth-helper` passes it to the
//! daemon's socket, and [`accept`] keeps it here.
//!
//! Process-wide on purpose: the credentials reach the daemon apart from any fetcher's options,
//! and every registry fetcher of the process must see them. Kept in memory only (never written
//! to disk), at most [`MAX_REPOSITORIES`] repositories, the oldest hand-over dropped first.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use serde::Deserialize;

use super::auth::{Credentials, IDENTITY_TOKEN_USER};
use crate::reference::Reference;

/// Repositories whose credentials are kept; a podman pulling from more hands them over again.
pub const MAX_REPOSITORIES: usize = 4096;
/// Largest hand-over accepted (podman sends one repository's credentials).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

#[derive(Default)]
struct Handed {
    next: u64,
    by_repository: HashMap<(String, String), (u64, Credentials)>,
}

fn handed() -> &'static Mutex<Handed> {
    static HANDED: OnceLock<Mutex<Handed>> = OnceLock::new();
    HANDED.get_or_init(Mutex::default)
}

/// Why a hand-over was refused.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("the hand-over is larger than {MAX_MESSAGE_BYTES} bytes")]
    TooLarge,
    #[error("the hand-over is not the JSON object podman sends: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("the hand-over names {0:?}, which is not an image reference")]
    BadReference(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    identity_token: String,
}

/// Takes podman's hand-over; returns the repositories (`registry/repository`) it gave
/// credentials for. Entries without any (an anonymous pull) change nothing.
pub fn accept(message: &[u8]) -> Result<Vec<String>, HandoverError> {
    if message.len() > MAX_MESSAGE_BYTES {
        return Err(HandoverError::TooLarge);
    }
    let entries: HashMap<String, Entry> = serde_json::from_slice(message)?;
    let mut parsed = Vec::with_capacity(entries.len());
    for (name, entry) in entries {
        let r = Reference::parse(&name).map_err(|_| HandoverError::BadReference(name.clone()))?;
        let creds = if !entry.identity_token.is_empty() {
            Credentials {
                username: IDENTITY_TOKEN_USER.into(),
                password: entry.identity_token,
            }
        } else if !entry.username.is_empty() || !entry.password.is_empty() {
            Credentials {
                username: entry.username,
                password: entry.password,
            }
        } else {
            continue;
        };
        parsed.push((r.registry, r.repository, creds));
    }
    let mut h = handed().lock().unwrap_or_else(|p| p.into_inner());
    let mut named = Vec::with_capacity(parsed.len());
    for (registry, repository, creds) in parsed {
        named.push(format!("{registry}/{repository}"));
        h.next += 1;
        let seq = h.next;
        h.by_repository.insert((registry, repository), (seq, creds));
    }
    while h.by_repository.len() > MAX_REPOSITORIES {
        let oldest = h
            .by_repository
            .iter()
            .min_by_key(|(_, (seq, _))| *seq)
            .map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            h.by_repository.remove(&k);
        }
    }
    Ok(named)
}

/// What podman last handed over for exactly this repository.
pub fn lookup(registry: &str, repository: &str) -> Option<Credentials> {
    let h = handed().lock().unwrap_or_else(|p| p.into_inner());
    h.by_repository
        .get(&(registry.to_string(), repository.to_string()))
        .map(|(_, c)| c.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_podman_hands_over_per_repository() {
        let named = accept(
            br#"{"handover.test:5000/team/app:v1": {"username": "u", "password": "p"},
                 "docker.io/library/token:latest": {"identityToken": "refresh"}}"#,
        )
        .unwrap();
        assert_eq!(named.len(), 2);
        let c = lookup("handover.test:5000", "team/app").unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("u", "p"));
        assert!(lookup("handover.test:5000", "team").is_none());
        let t = lookup("docker.io", "library/token").unwrap();
        assert_eq!(t.identity_token(), Some("refresh"));
        // An anonymous pull changes nothing; a new hand-over replaces the old one.
        let anonymous = accept(br#"{"handover.test:5000/team/app@sha256:0000000000000000000000000000000000000000000000000000000000000000": {}}"#).unwrap();
        assert!(anonymous.is_empty());
        assert_eq!(
            lookup("handover.test:5000", "team/app").unwrap().username,
            "u"
        );
        accept(br#"{"handover.test:5000/team/app": {"username": "u2", "password": "p2"}}"#)
            .unwrap();
        assert_eq!(
            lookup("handover.test:5000", "team/app").unwrap().username,
            "u2"
        );
    }

    #[test]
    fn refuses_what_podman_does_not_send() {
        assert!(matches!(
            accept(b"[1, 2]"),
            Err(HandoverError::Malformed(_))
        ));
        assert!(matches!(
            accept(br#"{"not a reference!": {"username": "u"}}"#),
            Err(HandoverError::BadReference(_))
        ));
        let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(accept(&big), Err(HandoverError::TooLarge)));
    }
}
