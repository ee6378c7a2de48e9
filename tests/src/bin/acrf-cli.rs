//! The `acrf` command line, built inside this package so that its end-to-end tests can run it as a real
//! process (`CARGO_BIN_EXE_acrf-cli`); it is the same `main` as the installed binary.
fn main() -> std::process::ExitCode {
    acrf_coordinator::commands::main().into()
}
