//! Fuzzes a whole link: a server session and an agent session, each fed
//! what the other sends and, between them, frames and events the input makes
//! up (any bytes as a frame, socket events, time passing). The input's
//! first three bytes choose the features each side has (an original agent
//! that offers none, an older server that supports some). No input may
//! panic either session, and neither may send a frame it could not build or
//! that its peer did not announce.
#![no_main]

use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;
use zlayer_tunnel::auth::TokenScope;
use zlayer_tunnel::config::{ServiceConfig, TunnelClientConfig, TunnelServerConfig};
use zlayer_tunnel::protocol::{AuthRefusal, Features, Message, RegisterRefusal};
use zlayer_tunnel::session::{AgentAction, AgentSession, ServerAction, ServerSession, SocketEvent};

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut now = start;
    let (shape, mut input) = match data {
        [a, b, c, rest @ ..] => ([*a, *b, *c], rest),
        _ => return,
    };
    let features = |bits: u16| Features::from_bits(u32::from(bits) & Features::ALL.bits());
    let server_config = TunnelServerConfig::default();
    let mut server_settings = server_config.session_settings();
    server_settings.supported = features(u16::from_le_bytes([shape[0], shape[1]]));
    let mut server = ServerSession::new(server_settings, now);
    let agent_config = TunnelClientConfig::new("ws://127.0.0.1:1/tunnel/v1", "token")
        .with_service(ServiceConfig::tcp("ssh", 22))
        .with_service(ServiceConfig::udp("dns", 53));
    let mut agent_settings = agent_config.session_settings(Uuid::from_u128(7));
    agent_settings.offer = match shape[2] {
        0 => None, // an original agent: no extension block
        1 => agent_settings.offer,
        bits => Some(features(u16::from(bits) << 1 | u16::from(bits & 1))),
    };
    let mut agent = AgentSession::new(agent_settings, now);
    let (mut to_server, mut to_agent): (Vec<Bytes>, Vec<Bytes>) = (Vec::new(), Vec::new());
    let mut ids: Vec<Uuid> = Vec::new();
    for _ in 0..256 {
        // carry out both sessions' actions, as their actors would
        while let Some(action) = agent.poll_action() {
            match action {
                AgentAction::Send(m) => to_server.push(m.to_bytes()),
                AgentAction::Write(f) => to_server.push(f.into_bytes()),
                AgentAction::Authenticated { .. } => {
                    agent.register(ServiceConfig::tcp("ssh", 22), 0);
                    agent.register(ServiceConfig::udp("dns", 53), 0);
                }
                AgentAction::Dial { connection_id, .. } => {
                    ids.push(connection_id);
                    agent.dialed(connection_id);
                }
                AgentAction::OpenFlow { connection_id, .. } => agent.flow_started(connection_id),
                _ => {}
            }
        }
        while let Some(action) = server.poll_action() {
            match action {
                ServerAction::Send(m) => to_agent.push(m.to_bytes()),
                ServerAction::Write(f) => to_agent.push(f.into_bytes()),
                ServerAction::Authenticate { token, .. } => {
                    if token.expose() == "token" {
                        server.authenticated(Uuid::from_u128(1), TokenScope::default(), now, 0);
                    } else {
                        server.refused("invalid tunnel token", AuthRefusal::Token);
                    }
                }
                ServerAction::Allocate(r) => {
                    let service_id = Uuid::from_u128(100 + u128::from(r.seq));
                    let result = if r.seq % 3 == 2 {
                        Err(("taken".to_owned(), RegisterRefusal::Later))
                    } else {
                        Ok((service_id, 30_000))
                    };
                    server.allocated(r.seq, result);
                }
                ServerAction::FindService { id, .. } => {
                    let _ = server.relay_found(id);
                }
                _ => {}
            }
        }
        let Some((&op, rest)) = input.split_first() else {
            break;
        };
        input = rest;
        let take = |input: &mut &[u8], n: usize| -> Vec<u8> {
            let n = n.min(input.len());
            let (head, tail) = input.split_at(n);
            *input = tail;
            head.to_vec()
        };
        match op % 10 {
            0 if !to_server.is_empty() => server.handle_bytes(to_server.remove(0), now),
            1 if !to_agent.is_empty() => agent.handle_bytes(&to_agent.remove(0), now),
            2 => {
                let len = usize::from(take(&mut input, 1).first().copied().unwrap_or(0));
                server.handle_bytes(Bytes::from(take(&mut input, len)), now);
            }
            3 => {
                let len = usize::from(take(&mut input, 1).first().copied().unwrap_or(0));
                agent.handle_bytes(&take(&mut input, len), now);
            }
            4 => {
                let ms = u64::from(take(&mut input, 1).first().copied().unwrap_or(0)) * 50;
                now += Duration::from_millis(ms);
                server.handle_timeout(now, 0);
                agent.handle_timeout(now, 0);
            }
            5 => {
                let id = Uuid::from_u128(u128::from(
                    take(&mut input, 1).first().copied().unwrap_or(0),
                ));
                let _ = server.open_stream(
                    id,
                    Uuid::from_u128(100),
                    ("192.0.2.1:1", "192.0.2.9:30000"),
                    0,
                );
                ids.push(id);
            }
            6 if !ids.is_empty() => {
                let pick =
                    usize::from(take(&mut input, 1).first().copied().unwrap_or(0)) % ids.len();
                let id = ids[pick];
                let len = usize::from(take(&mut input, 1).first().copied().unwrap_or(0)) * 64;
                let frame = Message::data(id, Bytes::from(vec![7; len]))
                    .unwrap()
                    .to_bytes();
                let event = SocketEvent::Read { id, frame, len };
                if op & 0x10 == 0 {
                    server.socket_event(event)
                } else {
                    agent.socket_event(event)
                }
            }
            7 if !ids.is_empty() => {
                let id = ids[usize::from(op >> 4) % ids.len()];
                let event = match op >> 6 {
                    0 => SocketEvent::ReadEof { id },
                    1 => SocketEvent::Delivered { id, len: 1024 },
                    2 => SocketEvent::Failed { id },
                    _ => SocketEvent::Finished { id },
                };
                if op & 0x10 == 0 {
                    server.socket_event(event.clone())
                } else {
                    agent.socket_event(event)
                }
            }
            8 => {
                let id = Uuid::from_u128(u128::from(op));
                let _ =
                    server.open_flow(id, Uuid::from_u128(101), ("192.0.2.1:2", "192.0.2.9:30001"));
                server.flow_ended(Uuid::from_u128(u128::from(op >> 1)));
            }
            9 => server.disconnect("fuzz"),
            _ => {}
        }
    }
    assert_eq!(
        server.frames_unsent(),
        0,
        "the server built and announced every frame"
    );
    assert_eq!(
        agent.frames_unsent(),
        0,
        "the agent built and announced every frame"
    );
});
