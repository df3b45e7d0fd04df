//! The cluster secret end to end in one process: a primary store serves the node
//! API with a secret on loopback, and generated clients call `Stream`, `Promote`,
//! `Acknowledge` and `Status` without the secret, with another one, with a proof
//! replayed from an earlier call, and with the right one; a client with the
//! secret calls a server without it (an impostor). The tests run on a
//! current-thread runtime, so the server's log events reach the subscriber each
//! test installs for its own thread.

use std::path::Path;
use std::sync::Arc;

use super::test_logs::Logs;
use prost::Message;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::config::Secret;
use crate::store::cluster::unix_now_ms;
use crate::store::{CaptureOptions, Role, Store};

use super::auth::{self, ClusterKeys, Signed};
use super::proto::replication_client::ReplicationClient;
use super::proto::{AcknowledgeRequest, PromoteRequest, StatusRequest, StreamRequest};
use super::{PROTOCOL_VERSION, ServerSettings, serve};

const SECRET: &str = "the cluster secret 0123456789";
const SERVICE: &str = "/ltxfs.replication.v1.Replication/";

fn keys(secrets: &[&str]) -> ClusterKeys {
    ClusterKeys::new(secrets.iter().map(|secret| Secret::new(*secret)).collect())
}

/// Serves the node API of a primary store in `dir` with `secrets`; returns its URL.
async fn serve_primary(dir: &Path, secrets: &[&str], shutdown: &CancellationToken) -> String {
    let store = Arc::new(Store::open(dir, CaptureOptions::default(), Role::Primary).unwrap());
    let node = super::bad_input_tests::primary_node(&store, dir);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let settings = ServerSettings {
        keys: keys(secrets),
        ..ServerSettings::default()
    };
    tokio::spawn(serve(listener, node, settings, shutdown.clone()));
    url
}

async fn signed_client(url: &str, secrets: &[&str]) -> ReplicationClient<Signed<Channel>> {
    let channel = Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    ReplicationClient::new(Signed::new(channel, keys(secrets)))
}

fn stream_request() -> StreamRequest {
    StreamRequest {
        hostname: "node-z".into(),
        protocol_version: PROTOCOL_VERSION,
        ..StreamRequest::default()
    }
}

/// The `ltxfs-auth` value a client with `secret` sends for `message` to `method`,
/// with a fixed nonce, so that the test can send it twice.
fn proof(
    secret: &str,
    method: &str,
    nonce: u8,
    message: &impl Message,
) -> MetadataValue<tonic::metadata::Ascii> {
    let encoded = message.encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    body.extend_from_slice(&encoded);
    let header = auth::sign_request(
        &Secret::new(secret),
        &format!("{SERVICE}{method}"),
        unix_now_ms(),
        [nonce; 16],
        &body,
    );
    header.parse().unwrap()
}

/// A client that sends `proof` with every call, as a replaying attacker would.
async fn replaying_client(
    url: &str,
    proof: MetadataValue<tonic::metadata::Ascii>,
) -> ReplicationClient<
    tonic::service::interceptor::InterceptedService<
        Channel,
        impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone,
    >,
> {
    let channel = Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    ReplicationClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
        request
            .metadata_mut()
            .insert(auth::AUTH_HEADER, proof.clone());
        Ok(request)
    })
}

fn assert_refused(result: Result<impl std::fmt::Debug, tonic::Status>, why: &str) {
    let status = result.expect_err("the call was accepted");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains(why),
        "{status:?} does not say {why:?}"
    );
}

#[tokio::test]
async fn calls_without_the_secret_or_with_another_are_refused_and_logged() {
    let (logs, _guard) = Logs::capture();
    let shutdown = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let url = serve_primary(dir.path(), &[SECRET], &shutdown).await;

    for (client_secrets, why) in [
        (&[][..], "carries no ltxfs-auth header"),
        (&["another secret 0123456789"][..], "another cluster secret"),
    ] {
        let mut client = signed_client(&url, client_secrets).await;
        assert_refused(client.stream(stream_request()).await, why);
        assert_refused(client.promote(PromoteRequest {}).await, why);
        assert_refused(client.acknowledge(AcknowledgeRequest::default()).await, why);
        assert_refused(client.status(StatusRequest {}).await, why);
    }
    let line = logs
        .wait_for(
            "WARN",
            &[
                "refused a call to the node API",
                "Acknowledge",
                "another cluster secret",
            ],
        )
        .await;
    assert!(
        line.contains("peer=127.0.0.1:"),
        "the log names the peer: {line}"
    );

    // With the secret, every call gets through to the service.
    // A client in the middle of a rotation signs with the first of its secrets.
    let mut client = signed_client(&url, &[SECRET, "new secret 0123456789"]).await;
    assert!(client.status(StatusRequest {}).await.is_ok());
    let mut client = signed_client(&url, &[SECRET]).await;
    let mut stream = client.stream(stream_request()).await.unwrap().into_inner();
    assert!(
        stream.message().await.unwrap().is_some(),
        "the stream says Hello"
    );
    client
        .acknowledge(AcknowledgeRequest::default())
        .await
        .unwrap();
    // Promote reaches the role loop (absent here), which is not an auth failure.
    let refused = client.promote(PromoteRequest {}).await.unwrap_err();
    assert_ne!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    shutdown.cancel();
}

#[tokio::test]
async fn a_replayed_stream_promote_or_acknowledge_is_refused() {
    let (logs, _guard) = Logs::capture();
    let shutdown = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let url = serve_primary(dir.path(), &[SECRET], &shutdown).await;

    let request = stream_request();
    let mut client = replaying_client(&url, proof(SECRET, "Stream", 1, &request)).await;
    let mut stream = client.stream(request.clone()).await.unwrap().into_inner();
    assert!(
        stream.message().await.unwrap().is_some(),
        "the first call is served"
    );
    assert_refused(client.stream(request).await, "repeats an earlier call");

    let mut client = replaying_client(&url, proof(SECRET, "Promote", 2, &PromoteRequest {})).await;
    let first = client.promote(PromoteRequest {}).await.unwrap_err();
    assert_ne!(first.code(), tonic::Code::Unauthenticated, "{first:?}");
    assert_refused(
        client.promote(PromoteRequest {}).await,
        "repeats an earlier call",
    );

    let acknowledgement = AcknowledgeRequest {
        stream_id: 1,
        ..AcknowledgeRequest::default()
    };
    let mut client =
        replaying_client(&url, proof(SECRET, "Acknowledge", 3, &acknowledgement)).await;
    client.acknowledge(acknowledgement.clone()).await.unwrap();
    assert_refused(
        client.acknowledge(acknowledgement.clone()).await,
        "repeats an earlier call",
    );
    // The proof binds the body: another acknowledgement under it is refused too.
    let other = AcknowledgeRequest {
        stream_id: 2,
        ..AcknowledgeRequest::default()
    };
    assert_refused(client.acknowledge(other).await, "another cluster secret");
    logs.wait_for(
        "WARN",
        &["refused a call to the node API", "Acknowledge", "a replay"],
    )
    .await;
    shutdown.cancel();
}

#[tokio::test]
async fn a_node_without_the_secret_is_not_trusted_by_a_client_with_it() {
    for impostor_secrets in [&[][..], &["another secret 0123456789"][..]] {
        let shutdown = CancellationToken::new();
        let dir = tempfile::tempdir().unwrap();
        let url = serve_primary(dir.path(), impostor_secrets, &shutdown).await;
        let mut client = signed_client(&url, &[SECRET]).await;
        let refused = client.stream(stream_request()).await;
        let status = refused.expect_err("an impostor's stream was accepted");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(
            status.message().contains("another cluster secret")
                || status
                    .message()
                    .contains("does not prove it knows the cluster secret"),
            "{status:?}"
        );
        assert_refused(client.status(StatusRequest {}).await, "");
        shutdown.cancel();
    }
}

#[tokio::test]
async fn a_peer_that_connects_and_sends_nothing_is_disconnected() {
    use tokio::io::AsyncReadExt;
    let shutdown = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let url = serve_primary(dir.path(), &[SECRET], &shutdown).await;
    let address = url.trim_start_matches("http://").to_string();
    let mut idle = tokio::net::TcpStream::connect(&address).await.unwrap();
    let started = std::time::Instant::now();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(super::HANDSHAKE_TIMEOUT * 2, idle.read(&mut byte))
        .await
        .expect("the server closes an idle connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() >= super::HANDSHAKE_TIMEOUT - std::time::Duration::from_secs(1));
    shutdown.cancel();
}

#[tokio::test]
async fn streams_from_one_address_are_bounded() {
    let (logs, _guard) = Logs::capture();
    let shutdown = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let url = serve_primary(dir.path(), &[SECRET], &shutdown).await;
    let mut open = Vec::new();
    for _ in 0..super::MAX_STREAMS_PER_ADDRESS {
        let mut client = signed_client(&url, &[SECRET]).await;
        let mut stream = client.stream(stream_request()).await.unwrap().into_inner();
        assert!(stream.message().await.unwrap().is_some());
        open.push((client, stream));
    }
    let mut client = signed_client(&url, &[SECRET]).await;
    let refused = client.stream(stream_request()).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    logs.wait_for("WARN", &["refused a replication stream: too many streams"])
        .await;
    // A stream that ends gives its place back.
    drop(open.pop());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match client.stream(stream_request()).await {
            Ok(_) => break,
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the place was not given back"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    shutdown.cancel();
}
