//! The `soci-store` command line.

mod ztoc;

use clap::{Parser, Subcommand};

/// Lazily serve SOCI-indexed container images to podman.
#[derive(Parser, Debug)]
#[command(name = "soci-store", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build, inspect and read zTOCs (the per-layer SOCI table of contents).
    #[command(subcommand)]
    Ztoc(ztoc::ZtocCommand),
}

impl Cli {
    /// Runs the parsed command.
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Ztoc(cmd) => cmd.run(),
        }
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
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size too large: {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert!(parse_size("4 parsecs").is_err());
        assert!(parse_size("").is_err());
    }
}
