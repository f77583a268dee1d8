//! `projector query`: runs one SQL statement on a read-only connection to the read-model
//! database and prints the rows, as an aligned table or as JSON lines.

use super::exit::{Exit, UsageError};
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use rusqlite::types::ValueRef;

use crate::config::Config;

/// How `query` prints its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns, with a row count.
    Table,
    /// One JSON object per row.
    Json,
    /// RFC 4180 CSV with a header line.
    Csv,
}

/// A table's columns are as wide as their widest cell among this many first rows; the rows
/// after them are printed as they come, so a large result is never held whole.
const ROWS_MEASURED: usize = 1000;

pub fn query(
    sql: &str,
    config: &Path,
    database: Option<&Path>,
    format: Format,
    params: &[String],
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
        None => Config::load(config)?
            .daemon
            .sqlite_file("`projector query`")?
            .to_path_buf(),
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
            "projector query only reads: it opens the database read-only, and this statement would write"
        );
    }
    bind(&mut statement, params)?;
    let columns: Vec<String> = statement.column_names().map(|c| c.to_string()).collect();
    let mut rows = statement.raw_query();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut printed = match format {
        Format::Table => Printer::Table(TablePrinter::new(&columns)),
        Format::Json => Printer::Json,
        Format::Csv => {
            if !write_or_stop(&mut out, &csv_line(&columns)?)? {
                return Ok(Exit::Success);
            }
            Printer::Csv
        }
    };
    while let Some(row) = rows.next()? {
        let text = match &mut printed {
            Printer::Json => {
                let mut object = serde_json::Map::new();
                for (index, column) in columns.iter().enumerate() {
                    object.insert(column.clone(), to_json(row.get_ref(index)?));
                }
                format!("{}\n", serde_json::Value::Object(object))
            }
            Printer::Csv => {
                let cells: Vec<String> = (0..columns.len())
                    .map(|index| row.get_ref(index).map(to_csv))
                    .collect::<Result<_, _>>()?;
                csv_line(&cells)?
            }
            Printer::Table(table) => {
                let cells: Vec<String> = (0..columns.len())
                    .map(|index| row.get_ref(index).map(to_text))
                    .collect::<Result<_, _>>()?;
                table.row(cells)
            }
        };
        if !write_or_stop(&mut out, &text)? {
            return Ok(Exit::Success);
        }
    }
    let rest = match &mut printed {
        Printer::Table(table) => table.finish(),
        Printer::Csv | Printer::Json => String::new(),
    };
    write_or_stop(&mut out, &rest)?;
    // A reader that went away (`| head`) is not an error.
    match out.flush() {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => Err(err.into()),
        _ => Ok(Exit::Success),
    }
}

/// Binds each `name=value` to the statement's `:name` (or `@name`, `$name`), as text: SQLite
/// compares it with a column by the column's type, so `--param id=42` finds an integer 42.
fn bind(statement: &mut rusqlite::Statement, params: &[String]) -> anyhow::Result<()> {
    let mut bound = vec![false; statement.parameter_count()];
    for param in params {
        let Some((name, value)) = param.split_once('=') else {
            return Err(UsageError(format!(
                "--param {param:?}: write it as name=value, like --param account=42"
            ))
            .into());
        };
        let index = [":", "@", "$"]
            .iter()
            .find_map(|prefix| {
                statement
                    .parameter_index(&format!("{prefix}{name}"))
                    .ok()
                    .flatten()
            })
            .ok_or_else(|| {
                UsageError(format!(
                    "--param {name}: the query has no parameter :{name}"
                ))
            })?;
        statement.raw_bind_parameter(index, value)?;
        bound[index - 1] = true;
    }
    if let Some(missing) = bound.iter().position(|b| !b) {
        let name = statement
            .parameter_name(missing + 1)
            .map_or_else(|| format!("?{}", missing + 1), str::to_string);
        return Err(UsageError(format!(
            "the query's parameter {name} has no value: give it with --param {}=VALUE",
            name.trim_start_matches([':', '@', '$'])
        ))
        .into());
    }
    Ok(())
}

enum Printer {
    Table(TablePrinter),
    Json,
    Csv,
}

/// One CSV record, quoted as RFC 4180 asks.
fn csv_line(cells: &[String]) -> anyhow::Result<String> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(cells)?;
    Ok(String::from_utf8(writer.into_inner()?)?)
}

/// A table printed as it comes: its first rows are held to size the columns, the rest printed
/// at those widths.
struct TablePrinter {
    headings: Vec<String>,
    held: Vec<Vec<String>>,
    widths: Option<Vec<usize>>,
    count: usize,
}

impl TablePrinter {
    fn new(columns: &[String]) -> TablePrinter {
        TablePrinter {
            headings: columns
                .iter()
                .map(|c| crate::shown::escaped(c).into_owned())
                .collect(),
            held: Vec::new(),
            widths: None,
            count: 0,
        }
    }

    /// What to print for one more row (nothing while the first rows are held).
    fn row(&mut self, cells: Vec<String>) -> String {
        self.count += 1;
        if let Some(widths) = &self.widths {
            return aligned(&cells, widths);
        }
        self.held.push(cells);
        if self.held.len() < ROWS_MEASURED {
            return String::new();
        }
        self.release()
    }

    /// The header and the rows held, at the widths they give.
    fn release(&mut self) -> String {
        let widths = column_widths(&self.headings, &self.held);
        let mut out = aligned(&self.headings, &widths);
        out += &aligned(
            &widths.iter().map(|&w| "-".repeat(w)).collect::<Vec<_>>(),
            &widths,
        );
        for row in self.held.drain(..) {
            out += &aligned(&row, &widths);
        }
        self.widths = Some(widths);
        out
    }

    fn finish(&mut self) -> String {
        let mut out = if self.widths.is_none() {
            self.release()
        } else {
            String::new()
        };
        out += &format!(
            "({} row{})\n",
            self.count,
            if self.count == 1 { "" } else { "s" }
        );
        out
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

fn to_csv(value: ValueRef) -> String {
    match value {
        ValueRef::Null => String::new(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => f.to_string(),
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
        ValueRef::Blob(b) => format!("<{} bytes>", b.len()),
    }
}

fn column_widths(headings: &[String], rows: &[Vec<String>]) -> Vec<usize> {
    let mut widths: Vec<usize> = headings.iter().map(|c| c.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    widths
}

fn aligned(cells: &[String], widths: &[usize]) -> String {
    let padded: Vec<String> = cells
        .iter()
        .zip(widths)
        .map(|(cell, &width)| format!("{cell:<width$}"))
        .collect();
    padded.join("  ").trim_end().to_string() + "\n"
}

/// An aligned text table with a header line and a row count (the demo prints its result so).
#[cfg(any(feature = "demo", test))]
pub fn format_table(columns: &[String], rows: &[Vec<String>]) -> String {
    let mut table = TablePrinter::new(columns);
    let mut out = String::new();
    for row in rows {
        out += &table.row(row.clone());
    }
    out + &table.finish()
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
