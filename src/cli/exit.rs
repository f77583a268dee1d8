//! The exit statuses of every command, in one place, and which errors are the caller's mistake.

use std::process::ExitCode;

use crate::config::ConfigError;

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Success = 0,
    /// A failure at run time: the database cannot be opened, a query fails, the daemon refused.
    Failure = 1,
    /// A usage or configuration mistake: an argument out of range, a config that does not
    /// validate (its message names file:line:column).
    Usage = 2,
    /// `ctl` only: no daemon is running (no socket, or a stale one nobody listens on).
    NotRunning = 3,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

/// A command called wrongly, beyond what the argument parser checks (a number out of range).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl Exit {
    /// The status for an error that ended a command: the caller's mistake, or a failure.
    pub fn for_error(err: &anyhow::Error) -> Exit {
        if err.downcast_ref::<ConfigError>().is_some() || err.downcast_ref::<UsageError>().is_some()
        {
            Exit::Usage
        } else {
            Exit::Failure
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_and_usage_mistakes_exit_2_other_failures_1() {
        let usage = anyhow::Error::new(UsageError("--events must be at least 1".into()));
        assert_eq!(Exit::for_error(&usage), Exit::Usage);
        let failure = anyhow::anyhow!("the database is locked");
        assert_eq!(Exit::for_error(&failure), Exit::Failure);
        assert_eq!(ExitCode::from(Exit::NotRunning), ExitCode::from(3));
    }
}
