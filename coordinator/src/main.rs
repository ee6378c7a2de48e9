fn main() {
    acrf_coordinator::cli::main()
}
