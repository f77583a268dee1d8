//! A declarative projection's definition version: the file's own `version`, or else a hash of
//! what the file makes the projection do, so that a database built by another definition is
//! noticed.

use serde::Deserialize;

use super::ProjectionFile;

/// `version = "2024-06"` or `version = 3`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum ExplicitVersion {
    Text(String),
    Number(i64),
}

/// The version of the definition `file` holds.
pub(super) fn of(file: &ProjectionFile) -> String {
    match &file.version {
        Some(ExplicitVersion::Text(text)) => text.clone(),
        Some(ExplicitVersion::Number(number)) => number.to_string(),
        None => definition_hash(file),
    }
}

/// A hash of what the file makes the projection do (its schema, and each handler's SQL,
/// parameters and expected rows), blind to whitespace and comments of the TOML around them:
/// reformatting the file keeps the version, changing any SQL changes it.
fn definition_hash(file: &ProjectionFile) -> String {
    use sha2::Digest;
    let squeezed = |sql: &str| sql.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut hasher = sha2::Sha256::new();
    let mut part = |text: &str| {
        hasher.update((text.len() as u64).to_le_bytes());
        hasher.update(text.as_bytes());
    };
    part(&squeezed(file.schema.get_ref()));
    // Only where given, so that a file without PostgreSQL statements keeps its version.
    if let Some(schema) = &file.postgres_schema {
        part("postgres_schema");
        part(&squeezed(schema.get_ref()));
    }
    for (event_type, handler) in &file.on {
        part(event_type);
        part(&squeezed(handler.sql.get_ref()));
        if let Some(sql) = &handler.postgres_sql {
            part("postgres_sql");
            part(&squeezed(sql.get_ref()));
        }
        for (name, source) in &handler.params {
            part(name);
            part(source.get_ref());
        }
        part(&handler.expect_rows.map_or(String::new(), |n| n.to_string()));
    }
    let digest = hasher.finalize();
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("sql-{hex}")
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::SqlProjection;
    use crate::config::ConfigError;

    const BALANCES: &str = include_str!("../../../projections/account_balances.toml");

    #[test]
    fn the_version_ignores_layout_follows_the_sql_and_may_be_named() -> Result<(), ConfigError> {
        let version =
            |text: &str| SqlProjection::parse(Path::new("p.toml"), text).map(|p| p.version);
        let base = version(BALANCES)?;
        let reflowed = BALANCES.replace(" SET ", "\n    SET  ");
        assert_ne!(reflowed, BALANCES);
        assert_eq!(version(&reflowed)?, base);
        let changed = BALANCES.replace("balance + :amount", "balance + :amount * 1");
        assert_ne!(changed, BALANCES);
        assert_ne!(version(&changed)?, base);
        assert_eq!(version(&format!("version = 7\n{BALANCES}"))?, "7");
        Ok(())
    }
}
