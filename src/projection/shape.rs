//! Whether the tables a projection's setup makes are the tables the database already has.
//! `CREATE TABLE IF NOT EXISTS` keeps an older table of another shape as it is, and the
//! projection's statements then fail at run time, one poison event after another; `projector
//! check` says so before anything runs.

use rusqlite::Connection;

use super::{Projection, ProjectionError};

/// A table the projection makes with other columns than the database's table of that name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableMismatch {
    pub table: String,
    /// The columns as the projection's setup makes them (`name TYPE`).
    pub made: Vec<String>,
    /// The columns of the table in the database.
    pub found: Vec<String>,
}

/// The tables `projection` makes that `database` has with other columns.
pub fn mismatches(
    projection: &dyn Projection,
    database: &Connection,
) -> Result<Vec<TableMismatch>, ProjectionError> {
    let mut scratch = Connection::open_in_memory()?;
    let tx = scratch.transaction()?;
    projection.setup(&tx)?;
    let mut mismatches = Vec::new();
    for table in table_names(&tx)? {
        let made = columns(&tx, &table)?;
        let found = columns(database, &table)?;
        // An empty list: the database has no such table yet, and the setup will make it.
        if !found.is_empty() && found != made {
            mismatches.push(TableMismatch { table, made, found });
        }
    }
    Ok(mismatches)
}

fn table_names(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut statement = conn.prepare(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
    )?;
    let names = statement.query_map([], |row| row.get(0))?;
    names.collect()
}

/// `name TYPE` for each column of `table`, in order; empty if there is no such table.
fn columns(conn: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    let mut statement =
        conn.prepare("SELECT name, type FROM pragma_table_info(?1) ORDER BY cid")?;
    let columns = statement.query_map([table], |row| {
        let name: String = row.get(0)?;
        let kind: String = row.get(1)?;
        Ok(format!("{name} {kind}").trim_end().to_string())
    })?;
    columns.collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::sql::SqlProjection;
    use std::path::Path;

    #[test]
    fn a_table_of_another_shape_is_named_with_both_column_lists() -> anyhow::Result<()> {
        let projection = SqlProjection::parse(
            Path::new("p.toml"),
            r#"
schema = """
CREATE TABLE IF NOT EXISTS totals (account TEXT PRIMARY KEY, total INTEGER);
CREATE TABLE IF NOT EXISTS fresh (a TEXT)
"""
[on.added]
sql = "INSERT INTO totals VALUES (:account, 0)"
"#,
        )?;
        let database = Connection::open_in_memory()?;
        assert_eq!(mismatches(&projection, &database)?, [], "nothing there yet");
        database.execute_batch("CREATE TABLE totals (account TEXT PRIMARY KEY, sum REAL)")?;
        assert_eq!(
            mismatches(&projection, &database)?,
            [TableMismatch {
                table: "totals".into(),
                made: vec!["account TEXT".into(), "total INTEGER".into()],
                found: vec!["account TEXT".into(), "sum REAL".into()],
            }]
        );
        Ok(())
    }
}
