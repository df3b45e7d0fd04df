//! HTTP as a proxy must speak it: hop-by-hop headers stay on their hop
//! (RFC 9110, section 7.6.1), upgrades (WebSockets) join the two connections,
//! and the client's address is passed on in `X-Forwarded-For`.

use std::net::SocketAddr;

use hyper::header::{CONNECTION, COOKIE, HeaderMap, HeaderName, HeaderValue, UPGRADE};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::FORWARDED_HEADER;

/// The headers that belong to one connection, besides those `Connection` names.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// Whether the request asks to switch protocols (`Connection: upgrade` and an
/// `Upgrade` header).
pub(super) fn upgrade_requested(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE) && connection_tokens(headers).any(|token| token == "upgrade")
}

/// The lower-case tokens of every `Connection` header.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty())
}

/// Drops the hop-by-hop headers (keeping `Connection: upgrade` and `Upgrade`
/// when `upgrade` is set).
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<String> = connection_tokens(headers).collect();
    for name in named.iter().map(String::as_str).chain(HOP_BY_HOP) {
        if !(upgrade && name == "upgrade") {
            headers.remove(name);
        }
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
}

/// Makes a client's request headers fit for the next hop: hop-by-hop headers
/// removed, the client's address appended to `X-Forwarded-For`, and, for a
/// forwarded write, the number of forwards so far.
pub(super) fn prepare_request(
    headers: &mut HeaderMap,
    peer: SocketAddr,
    upgrade: bool,
    forwards: Option<u32>,
) {
    strip_hop_by_hop(headers, upgrade);
    let forwarded_for = HeaderName::from_static("x-forwarded-for");
    let chain = match headers.get(&forwarded_for).and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&chain) {
        headers.insert(forwarded_for, value);
    }
    if let Some(forwards) = forwards {
        headers.insert(FORWARDED_HEADER, HeaderValue::from(forwards));
    }
}

/// Makes an upstream answer's headers fit for the client's hop.
pub(super) fn prepare_response(headers: &mut HeaderMap, upgraded: bool) {
    strip_hop_by_hop(headers, upgraded);
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub(super) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim_matches('"'))
}

/// Copies bytes both ways between the client's and the upstream's upgraded
/// connections until either side closes.
pub(super) async fn join_upgraded(client: OnUpgrade, upstream: OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(error) => {
            tracing::debug!(%error, "an upgraded connection failed to start");
            return;
        }
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%error, "an upgraded connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn hop_by_hop_headers_stay_on_their_hop() {
        let mut request = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("x-kept", "yes"),
            ("x-forwarded-for", "10.0.0.1"),
        ]);
        let peer: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        prepare_request(&mut request, peer, false, Some(2));
        let mut names: Vec<&str> = request.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["ltxfs-forwarded", "x-forwarded-for", "x-kept"]);
        assert_eq!(request["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(request[FORWARDED_HEADER], "2");
    }

    #[test]
    fn an_upgrade_keeps_its_headers() {
        let mut request = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(upgrade_requested(&request));
        let peer: SocketAddr = "[::1]:5000".parse().unwrap();
        prepare_request(&mut request, peer, true, None);
        assert_eq!(request["connection"], "upgrade");
        assert_eq!(request["upgrade"], "websocket");
        assert!(!upgrade_requested(&headers(&[("upgrade", "websocket")])));
    }

    #[test]
    fn cookies_are_found_by_name() {
        let request = headers(&[("cookie", "a=1; __txid=00ff"), ("cookie", "b=2")]);
        assert_eq!(cookie(&request, "__txid"), Some("00ff"));
        assert_eq!(cookie(&request, "b"), Some("2"));
        assert_eq!(cookie(&request, "c"), None);
    }
}
