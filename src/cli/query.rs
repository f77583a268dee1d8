//! `projector query`: runs one SQL statement on a read-only connection to the read-model
//! database and prints the rows, as an aligned table or as JSON lines.

use super::exit::{Exit, UsageError};
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use rusqlite::types::ValueRef;

use crate::config::Config;

pub fn query(
    sql: &str,
    config: &Path,
    database: Option<&Path>,
    json: bool,
) -> anyhow::Result<Exit> {
    if sql.trim().is_empty() {
        return Err(UsageError(
            "the query is empty: give one SQL statement, like \"SELECT * FROM account_balances\""
                .into(),
        )
        .into());
    }
    let database = match database {
        Some(database) => database.to_path_buf(),
        None => Config::load(config)?.daemon.database,
    };
    if !database.exists() {
        anyhow::bail!(
            "database {} does not exist (has the daemon run yet?)",
            database.display()
        );
    }
    let conn = crate::store::open_reader(&database)
        .with_context(|| format!("opening {}", database.display()))?;
    let mut statement = conn.prepare(sql).context("preparing the query")?;
    if !statement.readonly() {
        anyhow::bail!(
            "projector query only reads: the database is opened read-only, and this statement would write"
        );
    }
    let columns: Vec<String> = statement.column_names().map(|c| c.to_string()).collect();
    let headings: Vec<String> = columns
        .iter()
        .map(|c| crate::shown::escaped(c).into_owned())
        .collect();
    let mut rows = statement.query([])?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut table: Vec<Vec<String>> = Vec::new();
    while let Some(row) = rows.next()? {
        if json {
            let mut object = serde_json::Map::new();
            for (index, column) in columns.iter().enumerate() {
                object.insert(column.clone(), to_json(row.get_ref(index)?));
            }
            if !write_or_stop(
                &mut out,
                &format!("{}\n", serde_json::Value::Object(object)),
            )? {
                return Ok(Exit::Success);
            }
        } else {
            table.push(
                (0..columns.len())
                    .map(|index| row.get_ref(index).map(to_text))
                    .collect::<Result<_, _>>()?,
            );
        }
    }
    if !json {
        write_or_stop(&mut out, &format_table(&headings, &table))?;
    }
    // A reader that went away (`| head`) is not an error.
    match out.flush() {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => Err(err.into()),
        _ => Ok(Exit::Success),
    }
}

/// Writes `text`; false when the reader has gone away (`projector query ... | head`).
fn write_or_stop(out: &mut impl Write, text: &str) -> std::io::Result<bool> {
    match out.write_all(text.as_bytes()) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(err) => Err(err),
    }
}

fn to_text(value: ValueRef) -> String {
    match value {
        ValueRef::Null => "NULL".into(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => f.to_string(),
        // A payload may carry escape sequences: the table shows them, never runs them.
        ValueRef::Text(t) => crate::shown::escaped(&String::from_utf8_lossy(t)).into_owned(),
        ValueRef::Blob(b) => format!("<{} bytes>", b.len()),
    }
}

fn to_json(value: ValueRef) -> serde_json::Value {
    match value {
        ValueRef::Null => serde_json::Value::Null,
        ValueRef::Integer(i) => i.into(),
        ValueRef::Real(f) => f.into(),
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned().into(),
        ValueRef::Blob(b) => format!("<{} bytes>", b.len()).into(),
    }
}

/// An aligned text table with a header line and a row count.
pub fn format_table(columns: &[String], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = columns.iter().map(|c| c.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, &width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(columns);
    out += &line(&widths.iter().map(|&w| "-".repeat(w)).collect::<Vec<_>>());
    for row in rows {
        out += &line(row);
    }
    out += &format!(
        "({} row{})\n",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    );
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_is_aligned() {
        let table = super::format_table(
            &["id".into(), "balance".into()],
            &[
                vec!["a".into(), "12".into()],
                vec!["long-id".into(), "3".into()],
            ],
        );
        assert_eq!(
            table,
            "id       balance\n-------  -------\na        12\nlong-id  3\n(2 rows)\n"
        );
    }
}
