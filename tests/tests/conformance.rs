//! The provider conformance suite (harness = false): every scenario against every provider
//! that is built, then the scenario x provider matrix and the line `N passed, N failed`.
//! The matrix is also written to `<target>/tmp/conformance-matrix.txt` for
//! `scripts/test.sh` to show at the end of the run.
//!
//! `IOTGW_BLESS=1` rewrites the golden files from this run (see
//! `iotgw_tests::conformance::normalize`).

use std::process::ExitCode;

use iotgw_tests::conformance::{columns, matrix};

fn main() -> ExitCode {
    // First, while the process has one thread (it may set DOCKER_HOST).
    let docker = iotgw_testkit::init();
    eprintln!("conformance: Docker: {docker:?}");
    if std::env::args().any(|a| a == "--list") {
        // `cargo test -- --list` asks every binary for its tests.
        for s in iotgw_tests::conformance::scenarios::Scenario::ALL {
            println!("{}: test", s.name());
        }
        return ExitCode::SUCCESS;
    }
    let report = iotgw_tests::runner::runtime().block_on(matrix::run(columns()));
    iotgw_testkit::cleanup();
    let text = report.render();
    print!("{text}");
    let file = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("conformance-matrix.txt");
    if let Err(e) = std::fs::write(&file, &text) {
        eprintln!("conformance: could not write {}: {e}", file.display());
    }
    if report.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
