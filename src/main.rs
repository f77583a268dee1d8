//! The `projector` binary: parses the command line, runs the command, and prints an error that
//! ended it once, with its causes; the exit statuses are `cli::exit`'s.

use std::process::ExitCode;

use clap::Parser;
use projector::cli::exit::Exit;

fn main() -> ExitCode {
    let cli = projector::cli::Cli::parse();
    match projector::cli::run(cli) {
        Ok(exit) => exit.into(),
        Err(err) => {
            use std::io::Write as _;
            // Not eprintln!: a closed stderr must not turn a failure into a panic.
            let _ = writeln!(std::io::stderr(), "projector: {err:#}");
            Exit::for_error(&err).into()
        }
    }
}
