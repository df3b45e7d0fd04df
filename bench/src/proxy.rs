//! `ltxfs bench proxy`: the latency the proxy adds to a read, against calling
//! the application directly, measured side by side in one run on loopback.
//!
//! The application is a minimal HTTP/1.1 server in this process that answers
//! every request with a short body. The proxy is the real one
//! ([`ltxfs::proxy::serve`]) in front of it, over a store (in a temporary
//! directory) that is the primary, so a read goes straight through, as it does
//! on any node for a request without a read-your-writes cookie. One client keeps
//! one connection to each side and sends `GET /` one request at a time; rounds
//! alternate between the direct and the proxied path so both see the same
//! machine noise. The report gives each path's latency percentiles and the
//! difference at the median, whose goal is at most [`GOAL_ADDED_P50`].
//!
//! Invariants: every task runs on a runtime this module owns and stops with it;
//! the temporary store is removed on every return path; every request has a
//! timeout.

use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use ltxfs::bridge::CommitBridge;
use ltxfs::lease::http::HttpClient;
use ltxfs::proxy::{self, ProxyNode, ProxySettings, WriteGate};
use ltxfs::store::{CaptureOptions, Role, Store};

use super::MachineInfo;
use super::replication::percentile;

/// The most the proxy may add to a read at the median (the goal).
pub const GOAL_ADDED_P50: Duration = Duration::from_micros(100);
/// How many rounds the requests are split into; the paths alternate per round.
const ROUNDS: usize = 10;
/// Requests per path before measuring, to open connections and warm caches.
const WARM_UP: usize = 200;
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The application's answer.
const BODY: &str = "ok\n";

/// What `ltxfs bench proxy` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyOptions {
    /// Requests measured per path.
    pub requests: usize,
}

/// Latency percentiles of one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latencies {
    /// The median.
    pub p50: Duration,
    /// The 90th percentile.
    pub p90: Duration,
    /// The 99th percentile.
    pub p99: Duration,
}

impl Latencies {
    fn of(mut figures: Vec<Duration>) -> Latencies {
        figures.sort_unstable();
        Latencies {
            p50: percentile(&figures, 50),
            p90: percentile(&figures, 90),
            p99: percentile(&figures, 99),
        }
    }
}

/// The outcome of `ltxfs bench proxy`.
#[derive(Debug, Clone)]
pub struct ProxyReport {
    /// The machine it ran on.
    pub machine: MachineInfo,
    /// Requests measured per path.
    pub requests: usize,
    /// Calling the application directly.
    pub direct: Latencies,
    /// Calling it through the proxy.
    pub proxied: Latencies,
}

impl ProxyReport {
    /// What the proxy adds at the median.
    pub fn added_p50(&self) -> Duration {
        self.proxied.p50.saturating_sub(self.direct.p50)
    }
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum ProxyBenchError {
    /// Setting up the runtime, the store or a listener failed.
    #[error("{context}")]
    Setup {
        /// What was being set up.
        context: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A request failed.
    #[error("GET {url} failed: {reason}")]
    Request {
        /// The URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

fn setup(context: &'static str) -> impl FnOnce(std::io::Error) -> ProxyBenchError {
    move |source| ProxyBenchError::Setup { context, source }
}

/// Runs the benchmark.
pub fn run(options: &ProxyOptions) -> Result<ProxyReport, ProxyBenchError> {
    let dir = tempfile::tempdir().map_err(setup("create a temporary data dir"))?;
    let machine = MachineInfo::collect(dir.path());
    let store =
        Store::open(dir.path(), CaptureOptions::default(), Role::Primary).map_err(|error| {
            ProxyBenchError::Setup {
                context: "open a store",
                source: std::io::Error::other(error),
            }
        })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(setup("start the async runtime"))?;
    let shutdown = CancellationToken::new();
    let measured = runtime.block_on(measure(Arc::new(store), options, &shutdown));
    shutdown.cancel();
    let (direct, proxied) = measured?;
    Ok(ProxyReport {
        machine,
        requests: options.requests,
        direct: Latencies::of(direct),
        proxied: Latencies::of(proxied),
    })
}

/// Starts the application and the proxy, then times both paths in alternating
/// rounds.
async fn measure(
    store: Arc<Store>,
    options: &ProxyOptions,
    shutdown: &CancellationToken,
) -> Result<(Vec<Duration>, Vec<Duration>), ProxyBenchError> {
    let app = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(setup("listen for the application"))?;
    let app_addr = app
        .local_addr()
        .map_err(setup("read the application's address"))?;
    tokio::spawn(serve_app(app, shutdown.clone()));
    let proxy_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(setup("listen for the proxy"))?;
    let proxy_addr = proxy_listener
        .local_addr()
        .map_err(setup("read the proxy's address"))?;
    let commits = Arc::new(CommitBridge::new());
    store.set_commit_listener(commits.clone());
    let settings = ProxySettings::forwarding(app_addr.to_string(), vec!["bench.db".to_string()]);
    let node = ProxyNode {
        store,
        commits,
        writes: Arc::new(WriteGate::new()),
    };
    tokio::spawn(proxy::serve(
        proxy_listener,
        settings,
        node,
        shutdown.clone(),
    ));

    let direct_url = format!("http://{app_addr}/");
    let proxied_url = format!("http://{proxy_addr}/");
    // One client per path, so each keeps its own connection.
    let (direct_client, proxied_client) = (HttpClient::new(), HttpClient::new());
    for _ in 0..WARM_UP {
        time_get(&direct_client, &direct_url).await?;
        time_get(&proxied_client, &proxied_url).await?;
    }
    let per_round = options.requests.div_ceil(ROUNDS).max(1);
    let (mut direct, mut proxied) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 {
            [
                (&direct_client, &direct_url, true),
                (&proxied_client, &proxied_url, false),
            ]
        } else {
            [
                (&proxied_client, &proxied_url, false),
                (&direct_client, &direct_url, true),
            ]
        };
        for (client, url, is_direct) in order {
            for _ in 0..per_round {
                let took = time_get(client, url).await?;
                if is_direct {
                    direct.push(took);
                } else {
                    proxied.push(took);
                }
            }
        }
    }
    Ok((direct, proxied))
}

/// The time one `GET url` takes, from sending to having the whole answer.
async fn time_get(client: &HttpClient, url: &str) -> Result<Duration, ProxyBenchError> {
    let started = Instant::now();
    let response = client
        .request(Method::GET, url, &[], Bytes::new(), REQUEST_TIMEOUT)
        .await
        .map_err(|error| ProxyBenchError::Request {
            url: url.to_string(),
            reason: error.to_string(),
        })?;
    let took = started.elapsed();
    if response.status != 200 || response.body != BODY {
        return Err(ProxyBenchError::Request {
            url: url.to_string(),
            reason: format!("answered {} {:?}", response.status, response.body_excerpt()),
        });
    }
    Ok(took)
}

/// The application: answers every request with [`BODY`].
async fn serve_app(listener: TcpListener, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            () = shutdown.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(|_request| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                    BODY.as_bytes(),
                ))))
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

impl fmt::Display for ProxyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.machine)?;
        writeln!(
            f,
            "GET latency, {} requests per path, one at a time on one kept-alive connection:",
            self.requests
        )?;
        writeln!(f)?;
        writeln!(f, "| path | p50 | p90 | p99 |")?;
        writeln!(f, "|---|---:|---:|---:|")?;
        for (name, latencies) in [
            ("direct to the app", self.direct),
            ("through the proxy", self.proxied),
        ] {
            writeln!(
                f,
                "| {name} | {} | {} | {} |",
                micros(latencies.p50),
                micros(latencies.p90),
                micros(latencies.p99)
            )?;
        }
        writeln!(f)?;
        let added = self.added_p50();
        write!(
            f,
            "added by the proxy at p50: {} (goal ≤ {}: {})",
            micros(added),
            micros(GOAL_ADDED_P50),
            if added <= GOAL_ADDED_P50 {
                "met"
            } else {
                "NOT met"
            }
        )
    }
}

fn micros(duration: Duration) -> String {
    format!("{:.0} µs", duration.as_secs_f64() * 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_come_from_the_sorted_figures() {
        let figures: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let latencies = Latencies::of(figures);
        assert_eq!(latencies.p50, Duration::from_micros(50));
        assert_eq!(latencies.p90, Duration::from_micros(90));
        assert_eq!(latencies.p99, Duration::from_micros(99));
    }
}
