//! One probe against one address: TCP connect, HTTP GET (status line
//! only) or UDP request/response, bounded by the check's timeout.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

use crate::config::{HealthCheck, Probe};

/// Longest HTTP status line accepted (bytes before the first `\n`).
const MAX_STATUS_LINE: usize = 1024;
/// Largest UDP answer read (the largest possible UDP payload).
const MAX_DATAGRAM: usize = 65_536;
/// How many bytes of an unexpected answer an error message quotes.
const PREVIEW_BYTES: usize = 64;

/// Why a probe failed. `Display` is the long, operator-readable message;
/// [`ProbeError::reason`] is a short form for tables and logs.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No (complete) answer within the check's timeout.
    #[error("no answer within {0:?} (probe timeout)")]
    Timeout(Duration),
    /// The connection could not be set up (other than refused), e.g. no
    /// route to the backend.
    #[error("connect failed: {0}")]
    Connect(io::Error),
    /// Nothing listens on the probed port: a TCP reset to the connect, or
    /// an ICMP port unreachable answering a UDP probe.
    #[error(
        "connection refused: nothing listens on the probed port \
         (TCP reset or ICMP port unreachable)"
    )]
    Refused,
    /// The HTTP server answered with another status code.
    #[error("HTTP status {got}, expected {want}")]
    HttpStatus {
        /// Status code received.
        got: u16,
        /// Status code the check expects.
        want: u16,
    },
    /// The answer was not what the protocol allows (e.g. not an HTTP
    /// status line, or the connection closed without an answer).
    #[error("bad response: {0}")]
    BadResponse(String),
    /// The UDP answer does not contain the expected text.
    #[error("UDP reply {got} does not contain {expected:?}")]
    UdpMismatch {
        /// The text the check expects in the answer.
        expected: String,
        /// The start of the answer received, quoted and escaped.
        got: String,
    },
    /// Another I/O error (local socket, send, receive, connection reset).
    #[error("I/O error: {0}")]
    Io(io::Error),
}

impl ProbeError {
    /// A short form of the error, e.g. `timeout 500ms`, `refused`,
    /// `http 503 (want 200)`, for status tables and compact logs.
    pub fn reason(&self) -> String {
        match self {
            Self::Timeout(after) => format!("timeout {after:?}"),
            Self::Connect(e) => format!("connect: {e}"),
            Self::Refused => "refused".into(),
            Self::HttpStatus { got, want } => format!("http {got} (want {want})"),
            Self::BadResponse(_) => "bad response".into(),
            Self::UdpMismatch { .. } => "udp reply mismatch".into(),
            Self::Io(e) => format!("io: {e}"),
        }
    }
}

/// Classifies an I/O error of a connect.
fn connect_err(e: io::Error) -> ProbeError {
    if e.kind() == io::ErrorKind::ConnectionRefused {
        ProbeError::Refused
    } else {
        ProbeError::Connect(e)
    }
}

/// Classifies an I/O error after the connect (send or receive).
fn io_err(e: io::Error) -> ProbeError {
    if e.kind() == io::ErrorKind::ConnectionRefused {
        ProbeError::Refused
    } else {
        ProbeError::Io(e)
    }
}

/// The start of `bytes`, lossily decoded, escaped and quoted, with `…`
/// when it was cut.
fn preview(bytes: &[u8]) -> String {
    let cut = bytes.len().min(PREVIEW_BYTES);
    let text = String::from_utf8_lossy(&bytes[..cut]);
    let ellipsis = if bytes.len() > cut { "…" } else { "" };
    format!("\"{}\"{ellipsis}", text.escape_debug())
}

/// The address a backend is probed at: the check's `port` if set, else the
/// VIP's port.
pub fn probe_addr(backend: IpAddr, vip_port: u16, check: &HealthCheck) -> SocketAddr {
    SocketAddr::new(backend, check.port.unwrap_or(vip_port))
}

/// Runs one probe of `check.probe` against `target` and returns its latency
/// (from the start of the probe to the answer that decided it).
///
/// `target` is the full address probed; [`probe_addr`] derives it from a
/// backend and its VIP. The whole probe is bounded by `check.timeout`
/// ([`ProbeError::Timeout`]); `interval`, `rise` and `fall` are not used
/// here. Must run inside a Tokio runtime.
pub async fn probe(target: SocketAddr, check: &HealthCheck) -> Result<Duration, ProbeError> {
    let start = tokio::time::Instant::now();
    let work = async {
        match &check.probe {
            Probe::Tcp => probe_tcp(target).await,
            Probe::Http {
                path,
                expect_status,
            } => probe_http(target, path, *expect_status).await,
            Probe::Udp { send, expect } => probe_udp(target, send, expect).await,
        }
    };
    match tokio::time::timeout(check.timeout, work).await {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ProbeError::Timeout(check.timeout)),
    }
}

async fn probe_tcp(target: SocketAddr) -> Result<(), ProbeError> {
    TcpStream::connect(target).await.map_err(connect_err)?;
    Ok(())
}

/// The request an HTTP probe sends.
fn http_request(target: SocketAddr, path: &str) -> String {
    let host = match target.ip() {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
         User-Agent: lbd-health\r\n\r\n"
    )
}

async fn probe_http(target: SocketAddr, path: &str, want: u16) -> Result<(), ProbeError> {
    if path.is_empty() || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ProbeError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("HTTP probe path {path:?} is empty or contains whitespace"),
        )));
    }
    let mut stream = TcpStream::connect(target).await.map_err(connect_err)?;
    stream
        .write_all(http_request(target, path).as_bytes())
        .await
        .map_err(io_err)?;
    let line = read_status_line(&mut stream).await?;
    let got = parse_status_line(&line)?;
    if got == want {
        Ok(())
    } else {
        Err(ProbeError::HttpStatus { got, want })
    }
}

/// Reads up to the first `\n` (without it and a preceding `\r`).
async fn read_status_line(stream: &mut TcpStream) -> Result<Vec<u8>, ProbeError> {
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 512];
    loop {
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            buf.truncate(end);
            break;
        }
        if buf.len() > MAX_STATUS_LINE {
            return Err(ProbeError::BadResponse(format!(
                "no end of the status line within {MAX_STATUS_LINE} bytes: {}",
                preview(&buf)
            )));
        }
        let n = stream.read(&mut chunk).await.map_err(io_err)?;
        if n == 0 {
            if buf.is_empty() {
                return Err(ProbeError::BadResponse(
                    "connection closed without an answer".into(),
                ));
            }
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(buf)
}

/// The status code of `HTTP/1.x NNN reason`.
fn parse_status_line(line: &[u8]) -> Result<u16, ProbeError> {
    let bad = || ProbeError::BadResponse(format!("not an HTTP status line: {}", preview(line)));
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let mut parts = text.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/") || code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    code.parse().map_err(|_| bad())
}

async fn probe_udp(target: SocketAddr, send: &str, expect: &str) -> Result<(), ProbeError> {
    let local: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await.map_err(ProbeError::Io)?;
    socket.connect(target).await.map_err(connect_err)?;
    socket.send(send.as_bytes()).await.map_err(io_err)?;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let n = socket.recv(&mut buf).await.map_err(io_err)?;
    let reply = &buf[..n];
    if expect.is_empty() || contains(reply, expect.as_bytes()) {
        Ok(())
    } else {
        Err(ProbeError::UdpMismatch {
            expected: expect.to_owned(),
            got: preview(reply),
        })
    }
}

/// Whether `needle` occurs in `haystack` (byte-wise).
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
pub(super) mod tests {
    use tokio::{net::TcpListener, time::timeout};

    use super::*;

    /// Upper bound of every wait in these tests.
    pub(in crate::health) const WAIT: Duration = Duration::from_secs(5);

    pub(in crate::health) fn check(probe: Probe, timeout: Duration) -> HealthCheck {
        HealthCheck {
            probe,
            port: None,
            interval: Duration::from_millis(30),
            timeout,
            rise: 2,
            fall: 3,
        }
    }

    fn http(expect_status: u16) -> Probe {
        Probe::Http {
            path: "/healthz".into(),
            expect_status,
        }
    }

    fn udp(send: &str, expect: &str) -> Probe {
        Probe::Udp {
            send: send.into(),
            expect: expect.into(),
        }
    }

    const SHORT: Duration = Duration::from_secs(1);

    /// An address on 127.0.0.1 where nothing listens (TCP).
    pub(in crate::health) async fn closed_tcp_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    /// An HTTP server answering every request with `answer`; returns its
    /// address and the first request it received.
    async fn http_server(
        answer: &'static [u8],
    ) -> (SocketAddr, tokio::sync::oneshot::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut request = Vec::new();
                let mut chunk = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                if let Some(tx) = tx.take() {
                    let _ = tx.send(String::from_utf8_lossy(&request).into_owned());
                }
                let _ = stream.write_all(answer).await;
                let _ = stream.shutdown().await;
            }
        });
        (addr, rx)
    }

    /// A UDP server answering every datagram with `answer(request)`, or not
    /// at all when `answer` returns `None`.
    async fn udp_server(answer: fn(&[u8]) -> Option<Vec<u8>>) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                if let Some(reply) = answer(&buf[..n]) {
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn tcp_connect_succeeds() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let latency = probe(addr, &check(Probe::Tcp, SHORT)).await.unwrap();
        assert!(latency < SHORT);
    }

    #[tokio::test]
    async fn tcp_refused() {
        let addr = closed_tcp_port().await;
        let err = probe(addr, &check(Probe::Tcp, SHORT)).await.unwrap_err();
        assert!(matches!(err, ProbeError::Refused), "{err:?}");
        assert_eq!(err.reason(), "refused");
        assert!(err.to_string().contains("refused"));
    }

    #[tokio::test]
    async fn http_200_sends_the_documented_request() {
        let (addr, request) = http_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        probe(addr, &check(http(200), SHORT)).await.unwrap();
        let request = timeout(WAIT, request).await.unwrap().unwrap();
        assert_eq!(
            request,
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
             User-Agent: lbd-health\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn http_503_is_a_status_error() {
        let (addr, _) = http_server(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let err = probe(addr, &check(http(200), SHORT)).await.unwrap_err();
        assert!(
            matches!(
                err,
                ProbeError::HttpStatus {
                    got: 503,
                    want: 200
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "HTTP status 503, expected 200");
        assert_eq!(err.reason(), "http 503 (want 200)");
        // And 503 passes when it is what the check expects.
        probe(addr, &check(http(503), SHORT)).await.unwrap();
    }

    #[tokio::test]
    async fn http_garbage_is_a_bad_response() {
        let (addr, _) = http_server(b"SSH-2.0-OpenSSH_9.6\r\n").await;
        let err = probe(addr, &check(http(200), SHORT)).await.unwrap_err();
        assert!(matches!(err, ProbeError::BadResponse(_)), "{err:?}");
        assert!(err.to_string().contains("SSH-2.0"), "{err}");

        let (addr, _) = http_server(b"").await;
        let err = probe(addr, &check(http(200), SHORT)).await.unwrap_err();
        assert!(matches!(err, ProbeError::BadResponse(_)), "{err:?}");
        assert!(err.to_string().contains("closed"), "{err}");
    }

    #[test]
    fn status_line_parsing() {
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content").unwrap(), 204);
        assert_eq!(parse_status_line(b"HTTP/1.0 404").unwrap(), 404);
        for bad in [
            &b"HTTP/1.1 20 OK"[..],
            b"HTTP/1.1 abc",
            b"",
            b"200 OK",
            b"\xff\xfe",
        ] {
            assert!(parse_status_line(bad).is_err(), "{bad:?}");
        }
        let long = vec![b'x'; 500];
        let msg = parse_status_line(&long).unwrap_err().to_string();
        assert!(msg.ends_with('…') && msg.len() < 120, "{msg}");
    }

    #[test]
    fn ipv6_host_header_is_bracketed() {
        let addr: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        assert!(http_request(addr, "/").contains("\r\nHost: [2001:db8::1]\r\n"));
    }

    #[tokio::test]
    async fn http_path_with_whitespace_is_rejected() {
        let (addr, _) = http_server(b"HTTP/1.1 200 OK\r\n\r\n").await;
        let probe_kind = Probe::Http {
            path: "/a b\r\nX: y".into(),
            expect_status: 200,
        };
        let err = probe(addr, &check(probe_kind, SHORT)).await.unwrap_err();
        assert!(matches!(err, ProbeError::Io(_)), "{err:?}");
    }

    #[tokio::test]
    async fn http_silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts and holds connections, never answers.
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let limit = Duration::from_millis(100);
        let start = std::time::Instant::now();
        let err = timeout(WAIT, probe(addr, &check(http(200), limit)))
            .await
            .unwrap()
            .unwrap_err();
        let took = start.elapsed();
        assert!(
            matches!(err, ProbeError::Timeout(t) if t == limit),
            "{err:?}"
        );
        assert!(took >= limit, "{took:?}");
        assert!(took < limit + Duration::from_millis(400), "{took:?}");
        assert_eq!(err.reason(), "timeout 100ms");
        server.abort();
    }

    #[tokio::test]
    async fn udp_echo_succeeds() {
        let addr = udp_server(|req| Some(req.to_vec())).await;
        probe(addr, &check(udp("ping", "ping"), SHORT))
            .await
            .unwrap();
        // Empty `expect`: any answer will do.
        let addr = udp_server(|_| Some(b"whatever".to_vec())).await;
        probe(addr, &check(udp("ping", ""), SHORT)).await.unwrap();
    }

    #[tokio::test]
    async fn udp_mismatch() {
        let addr = udp_server(|_| Some(b"nope\n".to_vec())).await;
        let err = probe(addr, &check(udp("ping", "pong"), SHORT))
            .await
            .unwrap_err();
        match &err {
            ProbeError::UdpMismatch { expected, got } => {
                assert_eq!(expected, "pong");
                assert_eq!(got, "\"nope\\n\"");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "UDP reply \"nope\\n\" does not contain \"pong\""
        );
    }

    #[tokio::test]
    async fn udp_no_answer_times_out() {
        let addr = udp_server(|_| None).await;
        let limit = Duration::from_millis(80);
        let start = std::time::Instant::now();
        let err = timeout(WAIT, probe(addr, &check(udp("ping", ""), limit)))
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, ProbeError::Timeout(_)), "{err:?}");
        assert!(start.elapsed() < limit + Duration::from_millis(400));
    }

    #[tokio::test]
    async fn udp_port_unreachable_is_refused() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        drop(socket);
        let err = timeout(WAIT, probe(addr, &check(udp("ping", ""), SHORT)))
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, ProbeError::Refused), "{err:?}");
        assert!(err.to_string().contains("ICMP port unreachable"));
    }
}
