//! The `soci-store` command line.

pub mod auth_helper;
mod blob;
mod index;
mod serve;
mod trace;
mod ztoc;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::backends::BackendRegistry;
use crate::config::Config;

/// Lazily serve SOCI-indexed container images to podman.
#[derive(Parser, Debug)]
#[command(name = "soci-store", version, about)]
pub(crate) struct Cli {
    /// Configuration file (default, when it exists: /etc/soci-store/config.toml, or for a user
    /// who is not root $XDG_CONFIG_HOME/soci-store/config.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build, inspect and read zTOCs (the per-layer SOCI table of contents).
    #[command(subcommand)]
    Ztoc(ztoc::ZtocCommand),
    /// Show the effective configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Read blobs through the configured fetchers.
    #[command(subcommand)]
    Blob(blob::BlobCommand),
    /// Copy what a host needs to serve an image from an S3 mirror alone (layers, configs,
    /// manifests, tags, SOCI indexes, zTOCs and prefetch artifacts), skipping blobs already there.
    Mirror(blob::MirrorArgs),
    /// Make a SOCI-enabled image (index manifest v2): zTOCs, SOCI index, annotated manifests.
    Convert(index::ConvertArgs),
    /// Make a SOCI index (v1) for an image and push it beside it (referrers API or fallback tag).
    Create(index::CreateArgs),
    /// Serve SOCI-indexed images to podman as a FUSE additional layer store.
    Serve(serve::ServeArgs),
    /// Internal: keeps a store's FUSE connection (stdin) open across daemon restarts.
    #[command(hide = true)]
    HoldFuse {
        /// The handoff socket to listen on.
        socket: PathBuf,
    },
    /// SOCI indexes in the local artifact store, and discovery.
    #[command(subcommand)]
    Index(index::IndexCommand),
    /// Read a start breakdown written by `serve --trace`.
    #[command(subcommand)]
    Trace(trace::TraceCommand),
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Print the effective configuration (defaults + file + environment) as TOML.
    Show,
}

/// What a command needs from the environment: the configuration and the known backends.
pub(crate) struct CliContext {
    pub config_path: Option<PathBuf>,
    pub backends: BackendRegistry,
}

impl CliContext {
    pub fn config(&self) -> anyhow::Result<Config> {
        Ok(Config::load(self.config_path.as_deref())?)
    }

    /// A multi-threaded runtime for commands that talk to the network.
    pub fn runtime(&self) -> anyhow::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")
    }
}

impl Cli {
    /// Runs the parsed command with the given backends.
    pub(crate) fn run_with(self, backends: BackendRegistry) -> anyhow::Result<()> {
        let ctx = CliContext {
            config_path: self.config,
            backends,
        };
        match self.command {
            Command::Ztoc(cmd) => cmd.run(ctx.config().ok().map(|c| c.artifacts)),
            Command::Config(ConfigCommand::Show) => {
                let config = ctx.config()?;
                // Building the backends validates every option, so `show` reports mistakes.
                ctx.backends.build_fetchers(&config)?;
                ctx.backends.check_cache(&config)?;
                print_out(&config.to_toml())
            }
            Command::Blob(cmd) => cmd.run(&ctx),
            Command::Mirror(args) => args.run(&ctx),
            Command::Convert(args) => args.run(&ctx),
            Command::Create(args) => args.run(&ctx),
            Command::Index(cmd) => cmd.run(&ctx),
            Command::Trace(cmd) => cmd.run(),
            Command::Serve(args) => args.run(&ctx),
            Command::HoldFuse { socket } => crate::store::handoff::hold(&socket),
        }
    }
}

/// The whole program: logging, arguments, backends, exit status. Custom builds call this with
/// their own [`BackendRegistry`].
pub fn main_with(backends: BackendRegistry) -> ExitCode {
    use tracing_subscriber::EnvFilter;
    let cli = Cli::parse();
    // The daemon tells what it does (mounts, takeovers, layers used and released); commands
    // speak only of trouble. fuser's notes on operations we leave unimplemented are noise.
    let default = match cli.command {
        Command::Serve(_) | Command::HoldFuse { .. } => "info,fuser=error",
        _ => "warn,fuser=error",
    };
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = EnvFilter::try_from_env("SOCI_STORE_LOG").unwrap_or_else(|_| default.into());
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(QuietFuseReplies),
        )
        .init();
    match cli.run_with(backends) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if ended_by_closed_stdout(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("soci-store: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Drops fuser's `Failed to send FUSE reply: No such file or directory` errors. The kernel
/// answers ENOENT to a reply for a request it no longer waits for, and nothing is wrong then:
/// fuser answers every FUSE_INTERRUPT (ENOSYS) and the interrupted request has usually been
/// answered already — Go programs such as podman get a SIGURG every few milliseconds, and each
/// one that lands during a FUSE request makes an interrupt — or the process that asked was killed.
/// Other reply failures are still logged.
struct QuietFuseReplies;

impl QuietFuseReplies {
    fn is_quiet(event: &tracing::Event<'_>) -> bool {
        /// The message, and the target of a `log` record (fuser logs through `log`; such
        /// records arrive with target `log` and the real one in a field).
        #[derive(Default)]
        struct Fields {
            message: String,
            log_target: Option<String>,
        }
        impl tracing::field::Visit for Fields {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                match field.name() {
                    "log.target" => self.log_target = Some(value.to_string()),
                    "message" => self.message = value.to_string(),
                    _ => {}
                }
            }
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.message = format!("{value:?}");
                }
            }
        }
        let target = event.metadata().target();
        if target != "log" && !target.starts_with("fuser") {
            return false;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        let from_fuser = f
            .log_target
            .as_deref()
            .unwrap_or(target)
            .starts_with("fuser");
        from_fuser
            && f.message.starts_with("Failed to send FUSE reply")
            && f.message.contains("(os error 2)")
    }
}

impl<S> tracing_subscriber::layer::Filter<S> for QuietFuseReplies {
    fn enabled(
        &self,
        _: &tracing::Metadata<'_>,
        _: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        true
    }

    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        !Self::is_quiet(event)
    }
}

pub(crate) use crate::config::parse_size;

/// Writes `text` to stdout; a reader that went away (EPIPE, as with `| head`) is a normal end.
pub(crate) fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = stdout();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if is_stdout_closed(&e) => Ok(()),
        other => Ok(other?),
    }
}

/// Standard output was closed by its reader (EPIPE, as with `| head`).
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub(crate) struct StdoutClosed;

fn is_stdout_closed(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<StdoutClosed>())
}

/// Whether an error is (or was caused by) [`StdoutClosed`].
fn ended_by_closed_stdout(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<StdoutClosed>()
            || c.downcast_ref::<std::io::Error>()
                .is_some_and(is_stdout_closed)
    })
}

/// Buffered standard output for what commands print. Unlike `println!` it never panics: write
/// errors are returned, and a reader that went away comes back as [`StdoutClosed`], which ends
/// the program quietly and successfully (a network EPIPE stays an ordinary error).
pub(crate) struct Out(std::io::BufWriter<std::io::StdoutLock<'static>>);

pub(crate) fn stdout() -> Out {
    Out(std::io::BufWriter::new(std::io::stdout().lock()))
}

fn mark_closed(e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::io::Error::new(std::io::ErrorKind::BrokenPipe, StdoutClosed)
    } else {
        e
    }
}

impl std::io::Write for Out {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf).map_err(mark_closed)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.0.write_all(buf).map_err(mark_closed)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush().map_err(mark_closed)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn only_replies_the_kernel_no_longer_waits_for_are_quiet() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::Layer;

        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || writer.clone())
                .with_filter(super::QuietFuseReplies),
        );
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(
                target: "fuser::reply",
                "Failed to send FUSE reply: No such file or directory (os error 2)"
            );
            // As a `log` record of fuser arrives (tracing-log).
            tracing::event!(
                target: "log",
                tracing::Level::ERROR,
                { log.target = "fuser::reply" },
                "Failed to send FUSE reply: No such file or directory (os error 2)"
            );
            tracing::error!(target: "fuser::reply", "Failed to send FUSE reply: Bad address (os error 14)");
            tracing::error!("No such file or directory (os error 2)");
            tracing::event!(
                target: "log",
                tracing::Level::ERROR,
                { log.target = "other" },
                "Failed to send FUSE reply: No such file or directory (os error 2)"
            );
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.lines().count(), 3, "{out}");
        assert!(out.contains("Bad address"), "{out}");
        assert_eq!(
            out.matches("Failed to send FUSE reply: No such file")
                .count(),
            1,
            "only the one from another target: {out}"
        );
    }

    /// The `--span-size` defaults clap shows are the library's constants.
    #[test]
    fn span_size_defaults_are_the_constants() {
        use clap::CommandFactory;
        let cli = super::Cli::command();
        let default = |path: &[&str]| {
            let mut cmd = &cli;
            for p in path {
                cmd = cmd.find_subcommand(p).unwrap();
            }
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_id() == "span_size")
                .unwrap();
            parse_size(arg.get_default_values()[0].to_str().unwrap()).unwrap()
        };
        assert_eq!(default(&["convert"]), crate::ztoc::DEFAULT_SPAN_SIZE);
        assert_eq!(default(&["create"]), crate::ztoc::DEFAULT_SPAN_SIZE);
        assert_eq!(default(&["ztoc", "build"]), crate::ztoc::UPSTREAM_SPAN_SIZE);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert!(parse_size("4 parsecs").is_err());
        assert!(parse_size("").is_err());
    }
}
