//! The schema migrations of both stores, embedded in the binary.
//!
//! Built here rather than with `sqlx::migrate!` so that the build does not compile sqlx's
//! proc-macro crate, which brings a second, host copy of sqlx, its drivers and SQLite. Each
//! migration is what `migrate!` makes of the same file (version and description from the name,
//! the checksum of the text), so a database migrated by either is accepted by the other.

use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use std::borrow::Cow;

/// One migration file: its name (`NNNN_description.sql`) and its text.
type File = (&'static str, &'static str);

macro_rules! files {
    ($dir:literal: $($name:literal),+ $(,)?) => {
        &[$(($name, include_str!(concat!("../../../migrations/", $dir, "/", $name)))),+]
    };
}

pub const SQLITE: &[File] = files!("sqlite": "0001_init.sql", "0002_statistics.sql", "0003_epoch_values.sql", "0004_test_sets.sql", "0005_loading.sql", "0006_unfolded_bitmaps.sql", "0007_attempt_logs.sql", "0008_custom_metrics.sql", "0009_lease_keys.sql", "0010_score_only.sql", "0011_divergences.sql");
pub const POSTGRES: &[File] = files!("postgres": "0001_init.sql", "0002_statistics.sql", "0003_epoch_values.sql", "0004_test_sets.sql", "0005_loading.sql", "0006_unfolded_bitmaps.sql", "0007_attempt_logs.sql", "0008_custom_metrics.sql", "0009_unfolded_results.sql", "0010_result_references.sql", "0011_epoch_rows_unchecked.sql", "0012_completion_unchecked.sql", "0013_lease_keys.sql", "0014_score_only.sql", "0015_divergences.sql");

/// The migrator for one dialect's files.
pub fn migrator(files: &[File]) -> Migrator {
    Migrator::with_migrations(
        files
            .iter()
            .map(|&(name, sql)| migration(name, sql))
            .collect(),
    )
}

fn migration(name: &'static str, sql: &'static str) -> Migration {
    let (version, rest) = name
        .split_once('_')
        .expect("migration files are named NNNN_name.sql");
    let version = version
        .parse()
        .expect("a migration's name starts with its version");
    let description = rest.trim_end_matches(".sql").replace('_', " ");
    let no_tx = sql.starts_with("-- no-transaction");
    Migration::new(
        version,
        Cow::Owned(description),
        MigrationType::Simple,
        sql.into_sql_str(),
        no_tx,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file in the migrations folders is embedded, in order, for both dialects alike.
    #[test]
    fn every_migration_file_is_embedded() {
        for (dir, files) in [("sqlite", SQLITE), ("postgres", POSTGRES)] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../migrations")
                .join(dir);
            let mut on_disk: Vec<String> = std::fs::read_dir(&path)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.ends_with(".sql"))
                .collect();
            on_disk.sort();
            let embedded: Vec<&str> = files.iter().map(|f| f.0).collect();
            assert_eq!(
                embedded, on_disk,
                "migrations/{dir}: add the file to store/migrations.rs"
            );
            let m = migrator(files);
            let versions: Vec<i64> = m.iter().map(|m| m.version).collect();
            assert_eq!(versions, (1..=files.len() as i64).collect::<Vec<_>>());
            assert_eq!(m.iter().next().unwrap().description, "init");
        }
    }
}
