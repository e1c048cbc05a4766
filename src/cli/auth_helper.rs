//! `soci-store-auth-helper`: name it as `additional-layer-store-auth-helper` in registries.conf
//! (podman >= 5.2). podman runs it, without arguments, each time it reads an image from a
//! registry, with the credentials of that pull as JSON on stdin; it passes them to every
//! `soci-store serve` of the state directory that the store's configuration names (the default
//! configuration file, then `SOCI_STORE_*` variables, as for `soci-store`).

use std::io::Read;
use std::process::ExitCode;

use crate::config::Config;
use crate::fetch::handover::MAX_MESSAGE_BYTES;

/// The whole helper program.
pub fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("soci-store-auth-helper: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let mut message = Vec::new();
    std::io::stdin()
        .take(MAX_MESSAGE_BYTES as u64 + 1)
        .read_to_end(&mut message)?;
    let config = Config::load(None)?;
    crate::store::auth_socket::deliver(&config.state_dir, &message)?;
    Ok(())
}
