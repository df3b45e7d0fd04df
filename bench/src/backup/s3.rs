//! Downloads from the moto S3 server of `ltxfs bench backup` ([`Moto`], from
//! test-support), straight into a file: object bodies are larger than
//! test-support's HTTP helper holds in memory. moto checks no signatures but
//! refuses requests with no `Authorization` header, so each request carries
//! [`Moto::AUTHORIZATION`]. URLs are path-style (`/<bucket>/<key>`); every
//! request has a timeout.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::BackupBenchError;
use test_support::Moto;

/// How long connecting, and each read or write, may take.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// The copy buffer of a GET.
const COPY_BUFFER_BYTES: usize = 1 << 20;

/// Downloads the object `key` of `bucket` from `moto` into `out`; returns its
/// size.
pub(super) fn get(
    moto: &Moto,
    bucket: &str,
    key: &str,
    out: &mut dyn Write,
) -> Result<u64, BackupBenchError> {
    let path = format!("/{bucket}/{key}");
    let failed = |problem: String| BackupBenchError::S3 {
        request: format!("GET {path}"),
        problem,
    };
    match request(moto.address(), &path, out) {
        Ok((200, bytes)) => Ok(bytes),
        Ok((status, _)) => Err(failed(format!("status {status}"))),
        Err(error) => Err(failed(error.to_string())),
    }
}

/// Sends `GET path` to `address` on a one-shot HTTP/1.1 connection and copies
/// the answer's body into `out`; returns the status and the body's size. A body with a `Content-Length` must arrive whole; one
/// without runs to the end of the connection; chunked bodies are refused
/// (moto sends none to these requests).
fn request(address: SocketAddr, path: &str, out: &mut dyn Write) -> io::Result<(u16, u64)> {
    let mut stream = TcpStream::connect_timeout(&address, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    // One write, so the request goes in one segment.
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: {}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n",
        Moto::AUTHORIZATION
    );
    stream.write_all(head.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed inside the answer's head",
            ));
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
        head.push_str(&line);
    }
    let (status, length) = parse_head(&head)?;
    let mut buffer = vec![0u8; COPY_BUFFER_BYTES];
    let mut copied = 0u64;
    loop {
        let want = match length {
            Some(length) if copied >= length => break,
            Some(length) => buffer.len().min((length - copied) as usize),
            None => buffer.len(),
        };
        let read = reader.read(&mut buffer[..want])?;
        if read == 0 {
            if length.is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the body ended after {copied} of {length:?} bytes"),
                ));
            }
            break;
        }
        out.write_all(&buffer[..read])?;
        copied += read as u64;
    }
    Ok((status, copied))
}

/// The status and `Content-Length` (if any) of an answer's head.
fn parse_head(head: &str) -> io::Result<(u16, Option<u64>)> {
    let status = test_support::http::status(head)?;
    let mut length = None;
    for (name, value) in head.lines().skip(1).filter_map(|line| line.split_once(':')) {
        let value = value.trim();
        if name.trim().eq_ignore_ascii_case("content-length") {
            length = Some(value.parse().map_err(|_| {
                io::Error::other(format!("a Content-Length that is not a number: {value:?}"))
            })?);
        } else if name.trim().eq_ignore_ascii_case("transfer-encoding")
            && value.eq_ignore_ascii_case("chunked")
        {
            return Err(io::Error::other("a chunked answer"));
        }
    }
    Ok((status, length))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn heads_give_the_status_and_length() {
        let head = "HTTP/1.1 200 OK\r\nServer: Werkzeug\r\ncontent-length: 42\r\n";
        assert_eq!(parse_head(head).expect("parses"), (200, Some(42)));
        assert_eq!(
            parse_head("HTTP/1.0 403 FORBIDDEN\r\n").expect("parses"),
            (403, None)
        );
        assert!(parse_head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n").is_err());
        assert!(parse_head("SSH-2.0-OpenSSH\r\n").is_err());
    }

    #[test]
    fn a_get_copies_exactly_the_body() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let address = listener.local_addr().expect("address");
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut request = [0u8; 1024];
            let read = stream.read(&mut request).expect("read the request");
            let request = String::from_utf8_lossy(&request[..read]).to_string();
            let body = vec![7u8; 3 * COPY_BUFFER_BYTES + 5];
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .expect("write the head");
            stream.write_all(&body).expect("write the body");
            request
        });
        let mut out = Vec::new();
        let (status, bytes) = request(address, "/b/k", &mut out).expect("request");
        let sent = server.join().expect("server thread");
        assert!(sent.starts_with("GET /b/k HTTP/1.1\r\n"), "{sent}");
        assert!(sent.contains("Authorization: AWS4-HMAC-SHA256"), "{sent}");
        assert_eq!((status, bytes), (200, 3 * COPY_BUFFER_BYTES as u64 + 5));
        assert_eq!(out.len(), 3 * COPY_BUFFER_BYTES + 5);
    }
}
