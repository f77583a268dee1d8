//! What a projection writes through on the PostgreSQL store: the batch's open transaction, with
//! the writer's prepared statements, so that a statement is parsed once per connection.

use postgres::types::ToSql;
use postgres::{Row, Statement, Transaction};

use crate::store::postgres::{prepare_cached, StatementCache};

/// The daemon's open transaction on PostgreSQL. The connection's `search_path` is the daemon's
/// schema, so tables are named without it.
pub struct PostgresTx<'a, 't> {
    tx: &'a mut Transaction<'t>,
    statements: &'a mut StatementCache,
}

impl<'a, 't> PostgresTx<'a, 't> {
    pub fn new(tx: &'a mut Transaction<'t>, statements: &'a mut StatementCache) -> Self {
        PostgresTx { tx, statements }
    }

    /// `sql` prepared on this connection (once).
    pub fn prepare(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        prepare_cached(self.tx, self.statements, sql)
    }

    /// Runs `sql` with `params` bound, and says how many rows it changed.
    pub fn execute(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        let statement = self.prepare(sql)?;
        self.tx.execute(&statement, params)
    }

    /// Runs a prepared statement with `params` bound, and says how many rows it changed.
    pub fn execute_prepared(
        &mut self,
        statement: &Statement,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        self.tx.execute(statement, params)
    }

    pub fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, postgres::Error> {
        let statement = self.prepare(sql)?;
        self.tx.query(&statement, params)
    }

    /// Runs statements without parameters, such as a schema.
    pub fn batch_execute(&mut self, sql: &str) -> Result<(), postgres::Error> {
        self.tx.batch_execute(sql)
    }
}
