//! Where a configuration mistake is, and what it is: every error names the file, line and
//! column it comes from, so an operator can jump straight to the mistake.

use std::fmt;
use std::path::{Path, PathBuf};

/// A place in a file, printed as `file:line:column` (or just `file` when it is the whole file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl Location {
    pub fn whole_file(file: &Path) -> Self {
        Location {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
        }
    }

    /// The location of byte `offset` of `source`, the text of `file`.
    pub fn at_offset(file: &Path, source: &str, offset: usize) -> Self {
        let mut end = offset.min(source.len());
        while !source.is_char_boundary(end) {
            end -= 1;
        }
        let before = &source[..end];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Location {
            file: file.to_path_buf(),
            line,
            column,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.file.display())
        } else {
            write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
        }
    }
}

/// A configuration mistake, located. The CLI exits with status 2 on these.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{location}: {message}")]
pub struct ConfigError {
    pub location: Location,
    pub message: String,
}

impl ConfigError {
    pub fn new(location: Location, message: impl Into<String>) -> Self {
        ConfigError {
            location,
            message: message.into(),
        }
    }

    /// Turns a TOML parse or type error of `source` (the text of `file`) into a located error.
    pub fn from_toml(file: &Path, source: &str, err: &toml::de::Error) -> Self {
        let Some(span) = err.span() else {
            return ConfigError::new(Location::whole_file(file), err.message().trim());
        };
        let mut message = err.message().trim().to_string();
        // `control_socket_mode = 0660` is not TOML (no leading zeros): say how to write it.
        let line_start = source[..span.start.min(source.len())]
            .rfind('\n')
            .map_or(0, |i| i + 1);
        if source[line_start..]
            .trim_start()
            .starts_with("control_socket_mode")
            && message.contains("leading zero")
        {
            message.push_str(
                "; write the socket mode as a string, like control_socket_mode = \"0660\"",
            );
        }
        ConfigError::new(Location::at_offset(file, source, span.start), message)
    }
}
