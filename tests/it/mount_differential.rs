//! Differential test: the same seeded random SQL workload runs on a database in a
//! plain temporary directory and on one in an ltxfs mount; every statement must
//! give the same result and the databases the same dump, in DELETE and WAL modes,
//! before and after a remount.

use std::path::Path;

use crate::common::*;
use rusqlite::Connection;

const OPS: usize = 400;
/// (seed, page size)
const SEEDS: [(u64, u32); 3] = [
    (0x5eed_0001, 4096),
    (0x5eed_0002, 1024),
    (0x5eed_0003, 65536),
];
const COMPARE_EVERY: usize = 50;
const REOPEN_EVERY: usize = 100;

struct Schema {
    tables: Vec<(String, i64)>,
    indexes: Vec<String>,
}

fn schema(conn: &Connection) -> Schema {
    let names = |kind: &str| -> Vec<String> {
        let mut stmt = conn
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = ?1 AND name NOT LIKE 'sqlite_%' ORDER BY name",
            )
            .unwrap();
        stmt.query_map([kind], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let tables = names("table")
        .into_iter()
        .map(|t| {
            let n = query_i64(conn, &format!("SELECT count(*) FROM \"{t}\""));
            (t, n)
        })
        .collect();
    Schema {
        tables,
        indexes: names("index"),
    }
}

fn int_value(rng: &mut Rng) -> String {
    match rng.below(10) {
        0 => "NULL".into(),
        1..=6 => (rng.below(200) as i64 - 50).to_string(),
        _ => (rng.next_u64() as i64).to_string(),
    }
}

fn text_value(rng: &mut Rng) -> String {
    if rng.chance(10) {
        return "NULL".into();
    }
    let len = if rng.chance(10) {
        rng.range(200, 3000)
    } else {
        rng.below(40)
    };
    let alphabet = b"abcdefghij klmnopqrstuvwxyz'_-0123456789";
    let text: String = (0..len)
        .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize] as char)
        .collect();
    format!("'{}'", text.replace('\'', "''"))
}

fn blob_value(rng: &mut Rng) -> String {
    let len = match rng.below(100) {
        0..=9 => return "NULL".into(),
        10..=69 => rng.below(100),
        70..=94 => rng.range(100, 3000),
        _ => rng.range(3000, 30_000),
    };
    format!("X'{}'", hex(&rng.bytes(len as usize)))
}

fn row_values(rng: &mut Rng) -> String {
    format!(
        "({}, {}, {})",
        int_value(rng),
        text_value(rng),
        blob_value(rng)
    )
}

fn where_clause(rng: &mut Rng) -> String {
    match rng.below(5) {
        0 => format!("id % {} = {}", rng.range(2, 7), rng.below(2)),
        1 => format!("a < {}", rng.below(200) as i64 - 50),
        2 => "b IS NULL".into(),
        3 => format!("length(c) > {}", rng.below(3000)),
        _ => format!("id > (SELECT max(id) FROM t0) - {}", rng.below(20)),
    }
}

/// One statement, chosen from the current schema of the reference database.
fn statement(rng: &mut Rng, s: &Schema) -> String {
    let table = |rng: &mut Rng| -> (String, i64) {
        if s.tables.is_empty() {
            ("t0".into(), 0)
        } else {
            rng.pick(&s.tables).clone()
        }
    };
    let r = rng.below(100);
    if s.tables.is_empty() || (r < 5 && s.tables.len() < 6) {
        return format!(
            "CREATE TABLE t{}(id INTEGER PRIMARY KEY, a INTEGER, b TEXT, c BLOB)",
            if s.tables.is_empty() { 0 } else { rng.below(8) }
        );
    }
    let (t, rows) = table(rng);
    match r {
        0..=7 if s.tables.len() > 1 && t != "t0" => format!("DROP TABLE {t}"),
        0..=13 => {
            let unique = if rng.chance(30) { "UNIQUE " } else { "" };
            let cols = rng.pick(&["a", "b", "a, b", "b, a", "length(c)", "a DESC"]);
            format!("CREATE {unique}INDEX i{} ON {t}({cols})", rng.below(10))
        }
        14..=17 if !s.indexes.is_empty() => {
            format!("DROP INDEX {}", rng.pick(&s.indexes))
        }
        _ if rows > 400 => format!("DELETE FROM {t} WHERE {}", where_clause(rng)),
        14..=54 => {
            let n = rng.range(1, 8);
            let values: Vec<String> = (0..n).map(|_| row_values(rng)).collect();
            if rng.chance(20) {
                let id = rng.below(rows as u64 + 10) + 1;
                format!(
                    "INSERT OR REPLACE INTO {t}(id, a, b, c) VALUES({id}, {}, {}, {})",
                    int_value(rng),
                    text_value(rng),
                    blob_value(rng)
                )
            } else {
                format!("INSERT INTO {t}(a, b, c) VALUES {}", values.join(", "))
            }
        }
        55..=74 => {
            let set = match rng.below(4) {
                0 => format!("a = {}", int_value(rng)),
                1 => format!("b = {}", text_value(rng)),
                2 => format!("c = {}", blob_value(rng)),
                _ => "a = coalesce(a, 0) + 1, b = b || 'x'".into(),
            };
            format!("UPDATE {t} SET {set} WHERE {}", where_clause(rng))
        }
        75..=89 => format!("DELETE FROM {t} WHERE {}", where_clause(rng)),
        _ => {
            let (src, _) = table(rng);
            format!(
                "INSERT INTO {t}(a, b, c) SELECT a, b, c FROM {src} ORDER BY id LIMIT {}",
                rng.range(1, 50)
            )
        }
    }
}

/// One unit of work: a statement, a transaction (maybe rolled back, maybe with a
/// savepoint), or VACUUM.
fn operation(rng: &mut Rng, s: &Schema) -> String {
    match rng.below(100) {
        0..=2 => "VACUUM".into(),
        3..=17 => {
            let mut sql = String::from("BEGIN;\n");
            for _ in 0..rng.range(1, 6) {
                sql.push_str(&statement(rng, s));
                sql.push_str(";\n");
            }
            if rng.chance(30) {
                sql.push_str("SAVEPOINT sp;\n");
                sql.push_str(&statement(rng, s));
                sql.push_str(";\n");
                sql.push_str(if rng.chance(50) {
                    "ROLLBACK TO sp;\n"
                } else {
                    "RELEASE sp;\n"
                });
            }
            sql.push_str(if rng.chance(30) {
                "ROLLBACK;"
            } else {
                "COMMIT;"
            });
            sql
        }
        _ => statement(rng, s),
    }
}

/// Runs `sql` and describes the outcome; an open transaction left by an error is
/// rolled back (the same on both sides).
fn execute(conn: &Connection, sql: &str) -> String {
    let mut outcome = match conn.execute_batch(sql) {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("error: {e}"),
    };
    if !conn.is_autocommit() {
        let rollback = conn.execute_batch("ROLLBACK");
        outcome.push_str(&format!(" (rolled back: {rollback:?})"));
    }
    outcome
}

/// Opens with `page_size` (only effective on a new database), the journal mode and a
/// small page cache, so that big transactions spill before COMMIT.
fn open(path: &Path, mode: &str, page_size: u32) -> Connection {
    let conn = open_db(path);
    conn.execute_batch(&format!("PRAGMA page_size={page_size}"))
        .unwrap();
    set_journal_mode(&conn, mode);
    conn.execute_batch("PRAGMA cache_size=20").unwrap();
    conn
}

fn compare(step: usize, seed: u64, reference: &Connection, mounted: &Connection, last_sql: &str) {
    let a = dump(reference);
    let b = dump(mounted);
    assert!(
        a == b,
        "seed {seed:#x}: dumps differ after op {step} (last: {:.300}): {}",
        last_sql,
        first_difference(&a, &b)
    );
}

fn differential(mode: &str) {
    let mut mount = Mount::start(MountOptions::default());
    let (_plain_dir, plain) = temp_root("ltxfs-plain-");
    let mut finals = Vec::new();
    for (seed, page_size) in SEEDS {
        let reference_path = plain.join(format!("diff-{seed:x}.db"));
        let mounted_path = mount.db_path(&format!("diff-{seed:x}.db"));
        let mut reference = open(&reference_path, mode, page_size);
        let mut mounted = open(&mounted_path, mode, page_size);
        let mut rng = Rng::new(seed);
        let mut last = String::new();
        let mut errors = 0;
        for step in 1..=OPS {
            let sql = operation(&mut rng, &schema(&reference));
            let want = execute(&reference, &sql);
            let got = execute(&mounted, &sql);
            assert_eq!(
                got, want,
                "seed {seed:#x} op {step}: outcome differs for {:.500}",
                sql
            );
            errors += usize::from(want.starts_with("error"));
            last = sql;
            if step % COMPARE_EVERY == 0 {
                compare(step, seed, &reference, &mounted, &last);
            }
            if step % REOPEN_EVERY == 0 {
                drop((reference, mounted));
                reference = open(&reference_path, mode, page_size);
                mounted = open(&mounted_path, mode, page_size);
            }
        }
        compare(OPS, seed, &reference, &mounted, &last);
        let final_schema = schema(&reference);
        eprintln!(
            "{mode} seed {seed:#x}: {OPS} ops, {errors} failed alike, tables {:?}, {} indexes",
            final_schema.tables,
            final_schema.indexes.len()
        );
        assert_eq!(integrity_check(&mounted), "ok");
        assert_eq!(
            query_i64(&mounted, "PRAGMA page_size"),
            i64::from(page_size)
        );
        finals.push((mounted_path, dump(&reference)));
    }
    mount.restart();
    for (path, expected) in finals {
        let conn = open_db(&path);
        let got = dump(&conn);
        assert!(
            got == expected,
            "{} differs after remount: {}",
            path.display(),
            first_difference(&expected, &got)
        );
        assert_eq!(integrity_check(&conn), "ok");
    }
}

#[test]
fn differential_delete() {
    differential("delete");
}

#[test]
fn differential_wal() {
    differential("wal");
}

/// The generator itself is deterministic (same seed, same SQL).
#[test]
fn generator_is_deterministic() {
    let s = Schema {
        tables: vec![("t0".into(), 3), ("t1".into(), 500)],
        indexes: vec!["i1".into()],
    };
    let run = |seed| {
        let mut rng = Rng::new(seed);
        (0..50).map(|_| operation(&mut rng, &s)).collect::<Vec<_>>()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}
