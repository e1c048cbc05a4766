//! Where soci-store keeps things by default: system paths (`/etc`, `/var/lib`, `/var/cache`,
//! `/run`) for root, the user's XDG directories for everyone else — rootless podman's users,
//! whose store runs inside podman's user namespace (`podman unshare`), where it is uid 0 but
//! still the user.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// The user's directories, when soci-store runs for a user rather than for the system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserDirs {
    /// `$XDG_CONFIG_HOME` (`~/.config`).
    pub config: PathBuf,
    /// `$XDG_DATA_HOME` (`~/.local/share`).
    pub data: PathBuf,
    /// `$XDG_CACHE_HOME` (`~/.cache`).
    pub cache: PathBuf,
    /// `$XDG_RUNTIME_DIR` (`/run/user/<uid>`).
    pub runtime: PathBuf,
}

/// The user this process runs for, as the host sees it: its uid, or, inside a user namespace,
/// the host uid its uid maps to. None for root on the host.
pub fn host_user() -> Option<u32> {
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok()?;
    let map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let host = host_id(&map, uid).unwrap_or(uid);
    (host != 0).then_some(host)
}

/// Whether this process runs in a user namespace other than the host's (e.g. under
/// `podman unshare`): its root is not the host's root.
pub fn in_user_namespace() -> bool {
    std::fs::read_to_string("/proc/self/uid_map")
        .map(|m| m.split_whitespace().collect::<Vec<_>>() != ["0", "0", "4294967295"])
        .unwrap_or(false)
}

/// The host id that `id` maps to in a `/proc/*/uid_map` text.
pub fn host_id(map: &str, id: u32) -> Option<u32> {
    map.lines().find_map(|l| {
        let mut f = l.split_whitespace().map(|x| x.parse::<u64>().ok());
        let (Some(Some(inside)), Some(Some(outside)), Some(Some(len))) =
            (f.next(), f.next(), f.next())
        else {
            return None;
        };
        let id = u64::from(id);
        (id >= inside && id - inside < len).then(|| u32::try_from(outside + (id - inside)).ok())?
    })
}

/// Whether every id in `ids` has a mapping in a `/proc/*/uid_map` (or `gid_map`) text; the
/// first that has none otherwise.
pub fn all_mapped(map: &str, ids: impl IntoIterator<Item = u32>) -> Result<(), u32> {
    ids.into_iter()
        .try_for_each(|id| host_id(map, id).map(|_| ()).ok_or(id))
}

/// The uid and gid maps of this process's user namespace, when it is not the host's.
#[derive(Clone, Debug)]
pub struct IdMaps {
    uid: String,
    gid: String,
}

impl IdMaps {
    /// None on the host, where every id is itself.
    pub fn current() -> Option<IdMaps> {
        if !in_user_namespace() {
            return None;
        }
        Some(IdMaps {
            uid: std::fs::read_to_string("/proc/self/uid_map").ok()?,
            gid: std::fs::read_to_string("/proc/self/gid_map").ok()?,
        })
    }

    /// Checks that files owned by these (uid, gid) pairs can be shown as they are: an id this
    /// namespace does not map would show as the overflow id (65534), where a plain rootless
    /// pull refuses the layer.
    pub fn check(&self, owners: impl IntoIterator<Item = (u32, u32)>) -> Result<(), String> {
        for (uid, gid) in owners {
            all_mapped(&self.uid, [uid]).map_err(|id| unmapped("uid", id))?;
            all_mapped(&self.gid, [gid]).map_err(|id| unmapped("gid", id))?;
        }
        Ok(())
    }
}

fn unmapped(what: &str, id: u32) -> String {
    format!(
        "a file is owned by {what} {id}, which this user namespace does not map (the user's /etc/sub{what} range is too small)"
    )
}

/// The user's directories, or None when soci-store runs for the system (root on the host).
pub fn user_dirs() -> Option<UserDirs> {
    let uid = host_user()?;
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let xdg = |var: &str, under_home: &str| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(under_home)))
            .unwrap_or_else(|| PathBuf::from(format!("/tmp/soci-store-{uid}/{under_home}")))
    };
    Some(UserDirs {
        config: xdg("XDG_CONFIG_HOME", ".config"),
        data: xdg("XDG_DATA_HOME", ".local/share"),
        cache: xdg("XDG_CACHE_HOME", ".cache"),
        runtime: std::env::var_os("XDG_RUNTIME_DIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(format!("/run/user/{uid}"))),
    })
}

/// `/etc/soci-store/config.toml`, or `$XDG_CONFIG_HOME/soci-store/config.toml` for a user.
pub fn config_file() -> PathBuf {
    match user_dirs() {
        Some(u) => u.config.join("soci-store/config.toml"),
        None => PathBuf::from("/etc/soci-store/config.toml"),
    }
}

/// `/var/lib/soci-store/<name>`, or `$XDG_DATA_HOME/soci-store/<name>` for a user.
pub fn data(name: &str) -> PathBuf {
    match user_dirs() {
        Some(u) => u.data.join("soci-store").join(name),
        None => PathBuf::from("/var/lib/soci-store").join(name),
    }
}

/// `/var/cache/soci-store`, or `$XDG_CACHE_HOME/soci-store` for a user.
pub fn cache() -> PathBuf {
    match user_dirs() {
        Some(u) => u.cache.join("soci-store"),
        None => PathBuf::from("/var/cache/soci-store"),
    }
}

/// `/run/soci-store`, or `$XDG_RUNTIME_DIR/soci-store` for a user.
pub fn runtime() -> PathBuf {
    match user_dirs() {
        Some(u) => u.runtime.join("soci-store"),
        None => PathBuf::from("/run/soci-store"),
    }
}

/// containers' registries.conf: the user's own when it exists (as podman reads it), else the
/// system's.
pub fn registries_conf() -> PathBuf {
    if let Some(u) = user_dirs() {
        let own = u.config.join("containers/registries.conf");
        if own.exists() {
            return own;
        }
    }
    PathBuf::from("/etc/containers/registries.conf")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_ids_through_a_user_namespace() {
        // What `podman unshare` shows for a user 1001 with subuids 100000:65536.
        let map = "         0       1001          1\n         1     100000      65536\n";
        assert_eq!(host_id(map, 0), Some(1001));
        assert_eq!(host_id(map, 1000), Some(100999));
        assert_eq!(host_id(map, 65536), Some(165535));
        assert_eq!(host_id(map, 65537), None);
        assert_eq!(all_mapped(map, [0, 33, 65534]), Ok(()));
        assert_eq!(all_mapped(map, [0, 70000, 33]), Err(70000));
        // The host's own map: everything is itself.
        let host = "         0          0 4294967295\n";
        assert_eq!(host_id(host, 4_000_000_000), Some(4_000_000_000));
        assert_eq!(host_id("garbage\n", 0), None);
    }
}
