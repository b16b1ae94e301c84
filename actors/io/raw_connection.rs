//! A control connection on a raw TCP socket (`ControlHandler::
//! handle_connection`, for hosts without an actix-web server): a place among
//! the connections awaiting authentication, the HTTP upgrade (checked by
//! `src/http_upgrade.rs`), then the control channel's WebSocket, pumped
//! between the socket and the actor until the session ends. Runs on the
//! library's runtime thread.

use std::net::SocketAddr;
use std::sync::Arc;

use actix_web_actors::ws;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::frame_guard::FrameGuard;
use super::socket_options::harden_control_socket;
use super::turns::{Turns, chunk_len};
use crate::actors::control_channel::ControlChannel;
use crate::actors::handles::control_handler::{AuthPlace, EVICTED, ServerShared};
use crate::http_upgrade::{self, UpgradeError};
use crate::protocol::MAX_MESSAGE_SIZE;
use crate::{Result, TunnelError};

/// The upgrade and the session on a raw socket (runs on the runtime thread).
pub(crate) async fn serve(
    shared: Arc<ServerShared>,
    std: std::net::TcpStream,
    peer: SocketAddr,
) -> Result<()> {
    let mut stream = TcpStream::from_std(std)?;
    let place = AuthPlace::take(&shared, peer);
    stream.set_nodelay(true)?;
    let config = shared.config.current();
    harden_control_socket(&stream, config.heartbeat_timeout);
    let deadline = config.auth_timeout;
    let (head, rest) = tokio::select! {
        head = tokio::time::timeout(deadline, read_head(&mut stream)) => {
            head.map_err(|_| TunnelError::Timeout)??
        }
        () = place.evicted() => return Err(TunnelError::connection_msg(EVICTED)),
    };
    let key = match http_upgrade::check_upgrade(&head, &config.control_path) {
        Ok(key) => key,
        Err(refusal) => return refuse_request(stream, refusal).await,
    };
    let accept = actix_http::ws::hash_key(key.as_bytes());
    let response = http_upgrade::switching_protocols(&accept);
    stream.write_all(response.as_bytes()).await?;
    let (read, mut write) = stream.into_split();
    let incoming = futures::stream::iter((!rest.is_empty()).then(|| Ok(rest))).chain(
        tokio_util::io::ReaderStream::with_capacity(read, 64 * 1024)
            .map(|r| r.map_err(actix_web::error::PayloadError::Io)),
    );
    let guarded = Turns::new(
        FrameGuard::new(Box::pin(incoming), MAX_MESSAGE_SIZE),
        chunk_len,
    );
    let codec = actix_http::ws::Codec::new().max_size(MAX_MESSAGE_SIZE);
    let mut outgoing = Box::pin(ws::WebsocketContext::with_codec(
        ControlChannel::new(shared, peer, place),
        guarded,
        codec,
    ));
    while let Some(chunk) = outgoing.next().await {
        match chunk {
            Ok(bytes) => write.write_all(&bytes).await?,
            Err(_) => break,
        }
    }
    let _ = write.shutdown().await;
    Ok(())
}

/// Answers a request that is not an upgrade to the control path (`404` or
/// `400`) and ends the connection.
async fn refuse_request(mut stream: TcpStream, refusal: UpgradeError) -> Result<()> {
    if let Some(response) = refusal.response() {
        stream.write_all(response.as_bytes()).await?;
    }
    Err(TunnelError::protocol(
        "not a websocket upgrade for the control path",
    ))
}

/// Reads the HTTP request head; returns it and the bytes that followed it.
async fn read_head(stream: &mut TcpStream) -> Result<(String, Bytes)> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let end = http_upgrade::head_end(&buf).map_err(|e| TunnelError::protocol(e.to_string()))?;
        if let Some(end) = end {
            let rest = buf.split_off(end).freeze();
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(TunnelError::connection_msg(
                "connection closed during the upgrade",
            ));
        }
    }
}
