//! The `projector` binary: parses the command line and maps errors to exit codes
//! (0 ok, 1 failure, 2 usage or configuration error).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = projector::cli::Cli::parse();
    match projector::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            use std::io::Write as _;
            // Not eprintln!: a closed stderr must not turn a failure into a panic.
            let _ = writeln!(std::io::stderr(), "projector: {err:#}");
            if err
                .downcast_ref::<projector::config::ConfigError>()
                .is_some()
            {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
