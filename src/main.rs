//! The `projector` binary: parses the command line, runs the command, and prints an error that
//! ended it once, with its causes; the exit statuses are `cli::exit`'s.

use std::process::ExitCode;

use clap::Parser;
use projector::cli::exit::Exit;

fn main() -> ExitCode {
    keep_large_blocks_mapped();
    projector::metrics::note_start();
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

/// glibc raises its mmap threshold to the largest block freed, so after the first large page
/// every later one comes from the heap and is not given back to the system: with a fixed
/// threshold, blocks of 1 MiB or more are mapped and returned when freed (BENCHMARKS.md).
fn keep_large_blocks_mapped() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt sets a parameter of the allocator under its own lock; it has no
    // precondition.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}
