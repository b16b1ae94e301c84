//! The listener's socket: bound with room for bursts both ways.

use super::*;

impl UdpServiceListener {
    /// Binds `host:port` for UDP, with a receive buffer for bursts.
    pub(crate) fn bind(host: &str, port: u16) -> io::Result<UdpSocket> {
        let addr = crate::actors::service_listener::ServiceListener::resolve(host, port)?;
        let domain = socket2::Domain::for_address(addr);
        let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, None)?;
        socket.set_reuse_address(true)?;
        let _ = socket.set_recv_buffer_size(4 << 20);
        let _ = socket.set_send_buffer_size(4 << 20);
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        UdpSocket::from_std(socket.into())
    }
}
