//! `appliance`: see `appliance --help`.

fn main() -> std::process::ExitCode {
    appliance::cli::main()
}
