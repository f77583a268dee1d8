//! The projection modules that ship with Projector, and the registry of the Rust ones.
//!
//! Declarative projections are TOML files in this folder, named by path in `consumer.toml`.
//! Rust projections are compiled in and named by `module = "..."`; to add one, write its file
//! here and add one line to `all()`.

pub mod account_ledger;

use crate::projection::Projection;

/// A Rust projection compiled into the binary.
pub struct RustModule {
    pub name: &'static str,
    pub description: &'static str,
    pub build: fn() -> std::sync::Arc<dyn Projection>,
}

/// Every Rust projection module, in a fixed order.
pub fn all() -> &'static [RustModule] {
    &[RustModule {
        name: "account_ledger",
        description: "per-account ledger of transactions, with counts, totals and last activity",
        build: || std::sync::Arc::new(account_ledger::AccountLedger),
    }]
}

pub fn find(name: &str) -> Option<&'static RustModule> {
    all().iter().find(|module| module.name == name)
}

/// The shipped declarative `account_balances`, for the demo (which runs with no files around).
pub const ACCOUNT_BALANCES_TOML: &str = include_str!("account_balances.toml");

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    #[test]
    fn module_names_are_unique() {
        let mut names = HashSet::new();
        for module in super::all() {
            assert!(
                names.insert(module.name),
                "{} is registered twice",
                module.name
            );
        }
    }
}
