//! A custom soci-store binary that adds a backend from another crate: the built-ins plus the
//! `http-mirror` fetcher. Build it with `cargo build --release --example custom-build`, then
//! select the backend by `type = "http-mirror"` in the config file.

fn main() -> std::process::ExitCode {
    let mut backends = soci_store::backends::BackendRegistry::with_builtins();
    soci_store_http_mirror::register(&mut backends);
    soci_store::cli::main_with(backends)
}
