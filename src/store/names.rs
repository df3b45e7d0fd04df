//! The naming rule of the mount root: which names are databases, which are SQLite's
//! companion files, and how each maps to a file in the data dir.
//!
//! Every name is a database unless it ends in one of SQLite's companion suffixes.
//! Names starting with `.` and names ending in `-pos` are reserved for files that
//! ltxfs itself serves.

use super::StoreError;

/// What a file in the mount root is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// The database file itself.
    Database,
    /// The rollback journal (`<db>-journal`).
    Journal,
    /// The write-ahead log (`<db>-wal`).
    Wal,
    /// The WAL index shared memory (`<db>-shm`).
    Shm,
    /// A super-journal of a multi-database transaction (`<db>-mj<suffix>`).
    SuperJournal(String),
}

/// A root name split into its database and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedName {
    /// The database the file belongs to.
    pub database: String,
    /// Which of the database's files it is.
    pub kind: FileKind,
}

const SUPER_JOURNAL_MARK: &str = "-mj";

impl FileKind {
    /// The file's name inside the database's directory in the data dir.
    pub fn backing_name(&self) -> String {
        match self {
            FileKind::Database => "database".to_string(),
            FileKind::Journal => "journal".to_string(),
            FileKind::Wal => "wal".to_string(),
            FileKind::Shm => "shm".to_string(),
            FileKind::SuperJournal(suffix) => format!("mj{suffix}"),
        }
    }

    /// The inverse of [`FileKind::backing_name`]; `None` for files ltxfs does not own.
    pub fn from_backing_name(name: &str) -> Option<FileKind> {
        match name {
            "database" => Some(FileKind::Database),
            "journal" => Some(FileKind::Journal),
            "wal" => Some(FileKind::Wal),
            "shm" => Some(FileKind::Shm),
            _ => name
                .strip_prefix("mj")
                .filter(|suffix| is_super_journal_suffix(suffix))
                .map(|suffix| FileKind::SuperJournal(suffix.to_string())),
        }
    }

    /// The name this kind of file has in the mount root for `database`.
    pub fn root_name(&self, database: &str) -> String {
        match self {
            FileKind::Database => database.to_string(),
            FileKind::Journal => format!("{database}-journal"),
            FileKind::Wal => format!("{database}-wal"),
            FileKind::Shm => format!("{database}-shm"),
            FileKind::SuperJournal(suffix) => format!("{database}{SUPER_JOURNAL_MARK}{suffix}"),
        }
    }
}

fn is_super_journal_suffix(suffix: &str) -> bool {
    !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Splits a root name into database and kind, or says why the name cannot be used.
pub fn parse_name(name: &str) -> Result<ParsedName, StoreError> {
    let invalid = |reason| StoreError::InvalidName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() || name.contains('/') || name.contains('\0') {
        return Err(invalid("not a file name"));
    }
    if name.starts_with('.') {
        return Err(invalid("names starting with '.' are reserved for ltxfs"));
    }
    if name.ends_with("-pos") {
        return Err(invalid(
            "names ending in -pos are reserved for ltxfs positions",
        ));
    }
    let suffixes = [
        ("-journal", FileKind::Journal),
        ("-wal", FileKind::Wal),
        ("-shm", FileKind::Shm),
    ];
    let (database, kind) = suffixes
        .into_iter()
        .find_map(|(suffix, kind)| name.strip_suffix(suffix).map(|base| (base, kind)))
        .or_else(|| {
            let (base, suffix) = name.rsplit_once(SUPER_JOURNAL_MARK)?;
            is_super_journal_suffix(suffix)
                .then(|| (base, FileKind::SuperJournal(suffix.to_string())))
        })
        .unwrap_or((name, FileKind::Database));
    if database.is_empty() {
        return Err(invalid(
            "a companion file needs a database name before its suffix",
        ));
    }
    Ok(ParsedName {
        database: database.to_string(),
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_databases_and_companions() {
        let cases = [
            ("app.db", "app.db", FileKind::Database),
            ("app.db-journal", "app.db", FileKind::Journal),
            ("app.db-wal", "app.db", FileKind::Wal),
            ("app.db-shm", "app.db", FileKind::Shm),
            (
                "app.db-mj1A2B3C9D4",
                "app.db",
                FileKind::SuperJournal("1A2B3C9D4".to_string()),
            ),
            ("my-database", "my-database", FileKind::Database),
        ];
        for (name, database, kind) in cases {
            let parsed = parse_name(name).unwrap();
            assert_eq!(parsed.database, database, "{name}");
            assert_eq!(parsed.kind, kind, "{name}");
            assert_eq!(parsed.kind.root_name(database), name);
            assert_eq!(
                FileKind::from_backing_name(&parsed.kind.backing_name()),
                Some(parsed.kind)
            );
        }
    }

    #[test]
    fn reserved_and_malformed_names_are_refused() {
        for name in [".primary", ".lag", "app.db-pos", "-wal", "", "a/b"] {
            assert!(parse_name(name).is_err(), "{name} should be refused");
        }
    }
}
