//! The HTTP upgrade of a control connection served on a raw TCP socket
//! (`ControlHandler::handle_connection`, where no actix-web server parses the
//! request): where the request head ends, whether it asks for a WebSocket on
//! the control path, and the answers (`101`, `400`, `404`, `503`). Pure: the
//! runtime reads and writes the bytes, and computes `Sec-WebSocket-Accept`.

/// Longest HTTP upgrade request head accepted.
pub(crate) const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Why a request is not served as a control channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UpgradeError {
    /// No blank line within [`MAX_REQUEST_HEAD`] bytes.
    #[error("http request head too large")]
    HeadTooLarge,
    /// A request for another path than the control path.
    #[error("http request for a path other than the control path")]
    NotFound,
    /// Not a `GET` with `Upgrade: websocket` and a `Sec-WebSocket-Key`.
    #[error("http request that is not a websocket upgrade")]
    BadRequest,
}

impl UpgradeError {
    /// The answer to send before closing; none for a head too large, which
    /// is dropped unanswered.
    pub(crate) fn response(self) -> Option<&'static str> {
        match self {
            Self::HeadTooLarge => None,
            Self::NotFound => {
                Some("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            }
            Self::BadRequest => {
                Some("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            }
        }
    }
}

/// Where the request head in `buf` ends (just past its blank line), `None`
/// while more bytes are needed, or `HeadTooLarge` once `buf` holds
/// [`MAX_REQUEST_HEAD`] bytes without one.
pub(crate) fn head_end(buf: &[u8]) -> Result<Option<usize>, UpgradeError> {
    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
        return Ok(Some(end + 4));
    }
    if buf.len() >= MAX_REQUEST_HEAD {
        return Err(UpgradeError::HeadTooLarge);
    }
    Ok(None)
}

/// Checks a WebSocket upgrade request for `path` (a query string is
/// ignored; header names are case-insensitive); returns its
/// `Sec-WebSocket-Key`.
pub(crate) fn check_upgrade(head: &str, path: &str) -> Result<String, UpgradeError> {
    let mut lines = head.split("\r\n");
    let mut request = lines.next().unwrap_or_default().split(' ');
    if request.next() != Some("GET") {
        return Err(UpgradeError::BadRequest);
    }
    let target = request.next().unwrap_or_default();
    if target.split('?').next() != Some(path) {
        return Err(UpgradeError::NotFound);
    }
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let upgrade = header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    match (upgrade, header("sec-websocket-key")) {
        (true, Some(key)) if !key.is_empty() => Ok(key),
        _ => Err(UpgradeError::BadRequest),
    }
}

/// The `101` that accepts an upgrade; `accept` is the `Sec-WebSocket-Accept`
/// value (base64 ASCII) computed from the request's key.
pub(crate) fn switching_protocols(accept: &[u8]) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        String::from_utf8_lossy(accept)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_ends_at_its_blank_line_within_the_limit() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        let head = b"GET / HTTP/1.1\r\n\r\n";
        assert_eq!(head_end(head), Ok(Some(head.len())));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nframe bytes"), Ok(Some(18)));
        let long = vec![b'a'; MAX_REQUEST_HEAD];
        assert_eq!(head_end(&long), Err(UpgradeError::HeadTooLarge));
        assert_eq!(head_end(&long[1..]), Ok(None));
        // a head that ended is taken, however much followed it in the same read
        let mut ended = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        ended.extend(&long);
        assert_eq!(head_end(&ended), Ok(Some(18)));
    }

    #[test]
    fn upgrade_requests_are_checked() {
        let ok = "GET /tunnel/v1 HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nSec-WebSocket-Key: abc==\r\n";
        assert_eq!(check_upgrade(ok, "/tunnel/v1"), Ok("abc==".into()));
        assert_eq!(check_upgrade(ok, "/other"), Err(UpgradeError::NotFound));
        let query =
            "GET /tunnel/v1?x=1 HTTP/1.1\r\nupgrade: websocket\r\nsec-websocket-key:  k \r\n";
        assert_eq!(check_upgrade(query, "/tunnel/v1"), Ok("k".into()));
        for bad in [
            "POST /tunnel/v1 HTTP/1.1\r\n",
            "GET /tunnel/v1 HTTP/1.1\r\nHost: x\r\n",
            "GET /tunnel/v1 HTTP/1.1\r\nUpgrade: h2c\r\nSec-WebSocket-Key: abc==\r\n",
            "GET /tunnel/v1 HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Key:\r\n",
            "",
        ] {
            assert_eq!(
                check_upgrade(bad, "/tunnel/v1"),
                Err(UpgradeError::BadRequest),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn refusals_answer_with_their_status_and_close() {
        let answer = |e: UpgradeError| e.response().unwrap_or_default();
        assert!(answer(UpgradeError::NotFound).starts_with("HTTP/1.1 404 "));
        assert!(answer(UpgradeError::BadRequest).starts_with("HTTP/1.1 400 "));
        for e in [UpgradeError::NotFound, UpgradeError::BadRequest] {
            assert!(answer(e).ends_with("Connection: close\r\n\r\n"));
        }
        assert_eq!(UpgradeError::HeadTooLarge.response(), None);
    }

    #[test]
    fn answers_are_complete_http_responses() {
        let accepted = switching_protocols(b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert!(accepted.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(accepted.contains("\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(accepted.ends_with("\r\n\r\n"));
    }
}
