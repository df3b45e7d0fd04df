//! A small web app on an ltxfs mount, meant to run behind the ltxfs proxy (the
//! end-to-end proxy tests use it).
//!
//! ```text
//! cargo run --example app -- --listen 127.0.0.1:8081 --db /mnt/ltxfs/app.db --name node-a
//! ```
//!
//! - `GET /items`: every item, one `id<TAB>text` line each.
//! - `POST /items` with a text body: stores it; answers `created <id> on <name>`.
//! - `GET /ws`: a WebSocket that echoes every message.
//!
//! It talks to SQLite as any app does: a connection per request (WAL mode, a
//! busy timeout). On a replica the database opens read-only and a write fails
//! with SQLite's read-only error, which the app reports as 500; behind the proxy,
//! writes never reach a replica's app. The table is created on first write.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// How long a request waits for another connection's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

struct App {
    db: PathBuf,
    name: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (listen, db, name) = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("app: {message}\nusage: app --listen ADDR --db PATH --name NAME");
            std::process::exit(2);
        }
    };
    let app = Arc::new(App { db, name });
    let router = Router::new()
        .route("/items", get(list).post(create))
        .route("/ws", get(echo))
        .with_state(app);
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("app: cannot listen on {listen}: {error}");
            std::process::exit(1);
        }
    };
    println!("app listening on {listen}");
    if let Err(error) = axum::serve(listener, router).await {
        eprintln!("app: {error}");
        std::process::exit(1);
    }
}

fn parse_args(
    mut args: impl Iterator<Item = String>,
) -> Result<(SocketAddr, PathBuf, String), String> {
    let (mut listen, mut db, mut name) = (None, None, None);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => {
                listen = Some(
                    value
                        .parse()
                        .map_err(|e| format!("--listen {value}: {e}"))?,
                )
            }
            "--db" => db = Some(PathBuf::from(value)),
            "--name" => name = Some(value),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok((
        listen.ok_or("--listen is required")?,
        db.ok_or("--db is required")?,
        name.ok_or("--name is required")?,
    ))
}

fn open(app: &App) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(&app.db)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

fn failure(error: impl std::fmt::Display) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response()
}

async fn list(State(app): State<Arc<App>>) -> Response {
    let listed = tokio::task::spawn_blocking(move || -> rusqlite::Result<String> {
        let conn = open(&app)?;
        let exists: bool = conn.query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE name = 'items'",
            [],
            |row| row.get(0),
        )?;
        if !exists {
            return Ok(String::new());
        }
        let mut statement = conn.prepare("SELECT id, text FROM items ORDER BY id")?;
        let rows = statement.query_map([], |row| {
            Ok(format!(
                "{}\t{}\n",
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?
            ))
        })?;
        rows.collect()
    })
    .await;
    match listed {
        Ok(Ok(text)) => text.into_response(),
        Ok(Err(error)) => failure(error),
        Err(error) => failure(error),
    }
}

async fn create(State(app): State<Arc<App>>, body: String) -> Response {
    let created = tokio::task::spawn_blocking(move || -> rusqlite::Result<String> {
        let conn = open(&app)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS items(id INTEGER PRIMARY KEY, text TEXT NOT NULL);",
        )?;
        conn.execute("INSERT INTO items(text) VALUES (?1)", [&body])?;
        Ok(format!(
            "created {} on {}\n",
            conn.last_insert_rowid(),
            app.name
        ))
    })
    .await;
    match created {
        Ok(Ok(text)) => text.into_response(),
        Ok(Err(error)) => failure(error),
        Err(error) => failure(error),
    }
}

async fn echo(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(|mut socket: WebSocket| async move {
        while let Some(Ok(message)) = socket.recv().await {
            if socket.send(message).await.is_err() {
                break;
            }
        }
    })
}
