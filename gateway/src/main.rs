//! `iotgw`: see `iotgw --help`.
fn main() -> std::process::ExitCode {
    iotgw::cli::main()
}
