//! One-shot HTTP/1.1 requests to the servers the tests and benchmarks start
//! (etcd's gateway, object-storage emulators), on a plain TCP connection:
//! enough for small `Connection: close` answers, with no client to set up.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The bound on connecting, and on each read and write.
const TIMEOUT: Duration = Duration::from_secs(5);

/// An HTTP answer, as text.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The status line and the headers.
    pub head: String,
    /// The rest of the bytes after the head (the answers read here are
    /// `Connection: close` and small, so not chunked).
    pub body: String,
}

impl Answer {
    /// Parses a whole answer.
    pub fn parse(answer: &[u8]) -> io::Result<Answer> {
        let head_end = answer
            .windows(4)
            .position(|window| window == b"\r\n\r\n")
            .ok_or_else(|| io::Error::other("an HTTP answer with no end of head"))?;
        let head = String::from_utf8_lossy(&answer[..head_end]).into_owned();
        Ok(Answer {
            status: status(&head)?,
            head,
            body: String::from_utf8_lossy(&answer[head_end + 4..]).into_owned(),
        })
    }

    /// The value of the header `name` (case-insensitive), if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .find(|(header, _)| header.trim().eq_ignore_ascii_case(name))
            .map(|(_, value)| value.trim())
    }
}

/// The status code in the status line an HTTP/1.x answer's `head` starts with.
pub fn status(head: &str) -> io::Result<u16> {
    head.strip_prefix("HTTP/1.1 ")
        .or_else(|| head.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::other(format!("not an HTTP answer: {head:?}")))
}

/// Sends `method path` with `headers` and `body` (after a `Content-Length`,
/// empty or not) to `address` with a one-shot HTTP/1.1 connection, and returns
/// the answer.
pub fn request(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> io::Result<Answer> {
    let mut stream = TcpStream::connect_timeout(&address, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    Answer::parse(&answer)
}
