fn main() -> std::process::ExitCode {
    acrf_coordinator::commands::main().into()
}
