fn main() {
    acrf_coordinator::commands::main()
}
