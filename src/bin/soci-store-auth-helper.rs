//! podman's `additional-layer-store-auth-helper` for soci-store (see `cli::auth_helper`).

fn main() -> std::process::ExitCode {
    soci_store::cli::auth_helper::main()
}
