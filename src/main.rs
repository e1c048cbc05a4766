fn main() -> std::process::ExitCode {
    soci_store::cli::main_with(soci_store::backends::BackendRegistry::with_builtins())
}
