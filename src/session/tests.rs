//! A server session against an agent session, in memory: every frame goes
//! through the codec both ways, the clock is fabricated, the registry is a
//! port pool and a table of tunnels. No socket.

use std::collections::{HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use uuid::Uuid;

use super::*;
use crate::auth::{AuthError, TokenScope};
use crate::config::ServiceConfig;
use crate::connections::{ConnectionAction, StreamSettings};
use crate::ports::PortPool;
use crate::protocol::{
    AuthRefusal, CloseKind, Features, Message, MessageType, RegisterRefusal, ServiceProtocol,
};
use crate::throttle::AuthThrottle;

const TOKEN: &str = "secret-token";
const SECOND: Duration = Duration::from_secs(1);

fn server_settings() -> ServerSettings {
    ServerSettings {
        auth_timeout: 10 * SECOND,
        heartbeat_interval: 5 * SECOND,
        heartbeat_timeout: 15 * SECOND,
        supported: Features::ALL,
        stream_window: 32 * 1024,
        max_services: 3,
        max_connections_per_service: 16_384,
        stream_reserve_per_service: 2,
        streams: streams(32 * 1024),
    }
}

/// A side's stream table settings (`send_initial` is set at negotiation).
fn streams(recv_initial: u32) -> StreamSettings {
    StreamSettings {
        max_streams: 8,
        recv_initial,
        recv_max: 256 * 1024,
        send_initial: 0,
        budget: 1024 * 1024,
    }
}

fn agent_settings(token: &str, offer: Option<Features>) -> AgentSettings {
    AgentSettings {
        token: token.into(),
        client_id: Uuid::from_u128(7),
        offer,
        stream_window: 128 * 1024,
        auth_timeout: 10 * SECOND,
        heartbeat_interval: 5 * SECOND,
        heartbeat_timeout: 15 * SECOND,
        streams: streams(128 * 1024),
        access_targets: vec!["10.0.0.9:22".to_owned()],
        max_flows: 3,
    }
}

/// Both ends, the wire between them, and the server's shared state.
struct Pair {
    now: Instant,
    server: ServerSession,
    agent: AgentSession,
    /// Frames on the wire, encoded, in each direction.
    to_server: VecDeque<Vec<u8>>,
    to_agent: VecDeque<Vec<u8>>,
    /// What each end did, for the assertions.
    server_log: Vec<ServerAction>,
    agent_log: Vec<AgentAction>,
    throttle: AuthThrottle,
    ports: PortPool,
    /// The registry's answer to opening a tunnel.
    tunnel_limit_reached: bool,
    peer: IpAddr,
    /// Names of the services asked for, in the order asked.
    asked: Vec<String>,
}

impl Pair {
    fn new(token: &str, offer: Option<Features>) -> Self {
        let now = Instant::now();
        Self {
            now,
            server: ServerSession::new(server_settings(), now),
            agent: AgentSession::new(agent_settings(token, offer), now),
            to_server: VecDeque::new(),
            to_agent: VecDeque::new(),
            server_log: Vec::new(),
            agent_log: Vec::new(),
            throttle: AuthThrottle::new(),
            ports: PortPool::new((30_000, 30_009)).unwrap(),
            tunnel_limit_reached: false,
            peer: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            asked: Vec::new(),
        }
    }

    fn unix_ms(&self) -> u64 {
        1_764_000_000_000
    }

    /// Carries out every action and delivers every frame until both ends are quiet.
    fn run(&mut self) {
        loop {
            let mut busy = false;
            while let Some(action) = self.agent.poll_action() {
                busy = true;
                self.agent_did(action);
            }
            while let Some(action) = self.server.poll_action() {
                busy = true;
                self.server_did(action);
            }
            if let Some(frame) = self.to_server.pop_front() {
                busy = true;
                let message = decode(&frame);
                self.server.handle_frame(message, self.now);
            }
            if let Some(frame) = self.to_agent.pop_front() {
                busy = true;
                let message = decode(&frame);
                self.agent.handle_frame(message, self.now);
            }
            if !busy {
                return;
            }
        }
    }

    fn agent_did(&mut self, action: AgentAction) {
        match &action {
            AgentAction::Send(message) => self.to_server.push_back(message.encode()),
            AgentAction::Authenticated { .. } => {
                for service in [ServiceConfig::tcp("ssh", 22), ServiceConfig::udp("dns", 53)] {
                    self.register(service, 0);
                }
            }
            _ => {}
        }
        self.agent_log.push(action);
    }

    fn server_did(&mut self, action: ServerAction) {
        match &action {
            ServerAction::Send(message) => self.to_agent.push_back(message.encode()),
            ServerAction::Authenticate { token, .. } => {
                let verdict = check_token(&mut self.throttle, self.peer, self.now, || {
                    (token.expose() == TOKEN)
                        .then_some(())
                        .ok_or(AuthError::InvalidToken)
                });
                match verdict {
                    Err(refusal) => self.server.refused(&refusal.to_string(), refusal.refusal()),
                    Ok(()) if self.tunnel_limit_reached => self
                        .server
                        .refused("server is at its limit of 1 tunnels", AuthRefusal::Later),
                    Ok(()) => {
                        let id = Uuid::from_u128(1);
                        let unix_ms = self.unix_ms();
                        self.server
                            .authenticated(id, TokenScope::default(), self.now, unix_ms);
                    }
                }
            }
            ServerAction::Allocate(registration) => {
                let result = self
                    .ports
                    .allocate(registration.remote_port)
                    .map(|port| (Uuid::from_u128(100 + registration.seq as u128), port))
                    .map_err(|e| (e.to_string(), RegisterRefusal::Later));
                self.server.allocated(registration.seq, result);
            }
            ServerAction::Unregister { port, .. } => {
                self.ports.release(*port);
            }
            _ => {}
        }
        self.server_log.push(action);
    }

    fn register(&mut self, service: ServiceConfig, port: u16) {
        let sent = self.agent.awaiting();
        let name = service.name.clone();
        self.agent.register(service, port);
        if self.agent.awaiting() > sent {
            self.asked.push(name);
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        let unix_ms = self.unix_ms();
        self.server.handle_timeout(self.now, unix_ms);
        self.agent.handle_timeout(self.now, unix_ms);
        self.run();
    }

    fn agent_closed(&self) -> Option<&LinkError> {
        self.agent_log.iter().find_map(|a| match a {
            AgentAction::Close(e) => Some(e),
            _ => None,
        })
    }

    fn server_closed(&self) -> Option<&CloseReason> {
        self.server_log.iter().find_map(|a| match a {
            ServerAction::Close(r) => Some(r),
            _ => None,
        })
    }

    fn registered(&self) -> Vec<(String, Option<u16>)> {
        self.agent_log
            .iter()
            .filter_map(|a| match a {
                AgentAction::Registered { service, port, .. } => {
                    Some((service.name.clone(), *port))
                }
                _ => None,
            })
            .collect()
    }

    fn sent_by_server(&self) -> Vec<MessageType> {
        self.server_log
            .iter()
            .filter_map(|a| match a {
                ServerAction::Send(m) => Some(m.message_type()),
                _ => None,
            })
            .collect()
    }
}

fn decode(frame: &[u8]) -> Message {
    Message::decode(frame)
        .expect("every frame a session sends decodes")
        .0
}

/// A server session whose agent offered `caps` and was accepted with
/// `scope`, with what it did so far consumed.
fn authenticated_server(
    caps: Option<crate::protocol::Capabilities>,
    scope: TokenScope,
    now: Instant,
) -> ServerSession {
    let mut server = ServerSession::new(server_settings(), now);
    let auth = Message::auth(TOKEN, Uuid::from_u128(7), caps).unwrap();
    server.handle_frame(auth, now);
    server.poll_action();
    server.authenticated(Uuid::from_u128(1), scope, now, 0);
    std::iter::from_fn(|| server.poll_action()).for_each(drop);
    server
}

/// A probe `Open` is looked up like any, answered by the server itself
/// (`ConnectAck`) and never relayed; one from a client that did not
/// announce `ACCESS_PROBE` is refused.
#[test]
fn a_probe_is_answered_by_the_server_and_relays_nothing() {
    let now = Instant::now();
    for (offered, answered) in [(Features::ALL, true), (Features::ACCESS, false)] {
        let caps = crate::protocol::Capabilities::new(offered);
        let mut server = authenticated_server(Some(caps), TokenScope::default(), now);
        let id = Uuid::from_u128(9);
        server.handle_frame(Message::probe(id, "ssh").unwrap(), now);
        let actions: Vec<_> = std::iter::from_fn(|| server.poll_action()).collect();
        match answered {
            true => {
                assert!(
                    matches!(
                        &actions[..],
                        [ServerAction::FindService { probe: true, .. }]
                    ),
                    "{actions:?}"
                );
                server.probe_found(id);
                let answer = server.poll_action();
                assert!(
                    matches!(answer, Some(ServerAction::Send(Message::ConnectAck { connection_id })) if connection_id == id),
                    "{answer:?}"
                );
            }
            false => assert!(
                matches!(
                    &actions[..],
                    [ServerAction::Send(Message::ConnectFail { .. })]
                ),
                "{actions:?}"
            ),
        }
    }
}

/// What a registration asks that its token's scope refuses is refused as
/// lasting: asking again soon would be refused again.
#[test]
fn a_scope_refusal_is_lasting() {
    let now = Instant::now();
    let scope = TokenScope {
        register: Some(vec!["web".into()]),
        ..TokenScope::default()
    };
    let mut server = authenticated_server(None, scope, now);
    let register = Message::register("db", ServiceProtocol::Tcp, 1, 0).unwrap();
    server.handle_frame(register, now);
    let answers: Vec<_> = std::iter::from_fn(|| server.poll_action()).collect();
    assert!(
        matches!(
            &answers[..],
            [ServerAction::Send(Message::RegisterFail {
                refusal: Some(RegisterRefusal::Lasting),
                ..
            })]
        ),
        "{answers:?}"
    );
}

#[test]
fn an_agent_authenticates_negotiates_and_registers_in_order() {
    let mut pair = Pair::new(TOKEN, Some(Features::ALL));
    pair.run();
    assert!(pair.server.is_open() && pair.agent.is_open());
    assert_eq!(pair.server.features(), Features::ALL);
    assert_eq!(pair.agent.features(), Features::ALL);
    assert_eq!(pair.server.agent_window(), 128 * 1024);
    assert!(pair.agent_log.iter().any(|a| matches!(
        a,
        AgentAction::Authenticated { server_window, .. } if *server_window == 32 * 1024
    )));
    let ports = pair.registered();
    assert_eq!(
        ports,
        [("ssh".into(), Some(30_000)), ("dns".into(), Some(30_001))]
    );
    assert!(matches!(pair.agent_log.last(), Some(AgentAction::Ready)));
    // AuthOk is followed at once by the server's first heartbeat
    let sent = pair.sent_by_server();
    assert_eq!(sent[..2], [MessageType::AuthOk, MessageType::Heartbeat]);
}

#[test]
fn a_wrong_token_is_refused_for_good_and_a_lockout_only_for_now() {
    let mut pair = Pair::new("wrong", Some(Features::ALL));
    pair.run();
    assert_eq!(pair.server_closed(), Some(&CloseReason::AuthRefused));
    let error = pair.agent_closed().expect("the agent's link ended");
    assert!(error.is_fatal(), "{error:?}");
    assert!(matches!(error, LinkError::TokenRefused { reason } if reason.contains("invalid")));

    // after the free failures the address is locked out: a retry can help
    let mut throttle = std::mem::take(&mut pair.throttle);
    for _ in 0..crate::throttle::FREE_FAILURES {
        let mut again = Pair::new("wrong", Some(Features::ALL));
        again.throttle = throttle;
        again.run();
        throttle = again.throttle;
    }
    let mut locked = Pair::new(TOKEN, Some(Features::ALL));
    locked.throttle = throttle;
    locked.run();
    let error = locked.agent_closed().expect("refused during the lockout");
    assert!(!error.is_fatal(), "{error:?}");
    assert!(
        error
            .to_string()
            .contains("too many failed authentications")
    );
    // once the lockout is over, the right token gets in
    let mut later = Pair::new(TOKEN, Some(Features::ALL));
    later.throttle = locked.throttle;
    later.now += crate::throttle::MAX_LOCKOUT;
    later.server = ServerSession::new(server_settings(), later.now);
    later.run();
    assert!(later.agent.is_open());
}

#[test]
fn a_full_server_is_a_refusal_to_retry() {
    let mut pair = Pair::new(TOKEN, Some(Features::ALL));
    pair.tunnel_limit_reached = true;
    pair.run();
    let error = pair.agent_closed().unwrap();
    assert!(matches!(error, LinkError::AuthRefused { .. }) && !error.is_fatal());
}

#[test]
fn a_legacy_agent_gets_only_the_original_messages() {
    let mut pair = Pair::new(TOKEN, None);
    pair.run();
    assert!(pair.agent.is_open());
    assert_eq!(pair.server.features(), Features::NONE);
    // no extension block in AuthOk, and the UDP service is not asked for
    let auth_ok = pair.server_log.iter().find_map(|a| match a {
        ServerAction::Send(Message::AuthOk { capabilities, .. }) => Some(*capabilities),
        _ => None,
    });
    assert_eq!(auth_ok, Some(None));
    assert_eq!(pair.registered(), [("ssh".into(), Some(30_000))]);
    assert!(pair.agent_log.iter().any(|a| matches!(
        a,
        AgentAction::NotRegistered { service, .. } if service.name == "dns"
    )));
    // a refusal carries no field the original agent does not know
    let mut wrong = Pair::new("wrong", None);
    wrong.run();
    let fail = wrong.server_log.iter().find_map(|a| match a {
        ServerAction::Send(m @ Message::AuthFail { .. }) => Some(m.clone()),
        _ => None,
    });
    assert_eq!(fail, Message::auth_fail("invalid tunnel token").ok());
}

#[test]
fn an_original_servers_refusal_stops_the_agent() {
    // the original server sends `AuthFail { reason }` and nothing more
    let now = Instant::now();
    let mut agent = AgentSession::new(agent_settings("t", Some(Features::ALL)), now);
    let fail = Message::auth_fail("Invalid token").unwrap();
    agent.handle_frame(decode(&fail.encode()), now);
    let close = std::iter::from_fn(|| agent.poll_action()).last();
    assert!(matches!(close, Some(AgentAction::Close(e)) if e.is_fatal()));
}

#[test]
fn an_original_server_registers_without_ports_and_carries_no_streams() {
    let now = Instant::now();
    let mut agent = AgentSession::new(agent_settings("t", Some(Features::ALL)), now);
    let ok = Message::AuthOk {
        tunnel_id: Uuid::from_u128(1),
        capabilities: None,
    };
    agent.handle_frame(ok, now);
    agent.register(ServiceConfig::tcp("web", 80), 0);
    let service_id = Uuid::from_u128(2);
    let reply = Message::RegisterOk {
        service_id,
        port: None,
    };
    agent.handle_frame(decode(&reply.encode()), now);
    let actions: Vec<_> = std::iter::from_fn(|| agent.poll_action()).collect();
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, AgentAction::Registered { port: None, .. }))
    );
    // a visitor of a legacy server is refused: there is no stream to carry it
    let connect = Message::connect(service_id, Uuid::from_u128(3), "192.0.2.9:4000").unwrap();
    agent.handle_frame(connect, now);
    let fail = agent.poll_action();
    assert!(
        matches!(fail, Some(AgentAction::Send(Message::ConnectFail { .. }))),
        "{fail:?}"
    );
}

#[test]
fn registrations_are_answered_in_order_under_refusals() {
    let mut pair = Pair::new(TOKEN, Some(Features::ALL));
    pair.run();
    // a taken port, the limit of 3 services, a free one: in the order asked
    pair.register(ServiceConfig::tcp("ssh", 2222), 0);
    pair.register(ServiceConfig::tcp("taken", 8080), 30_000);
    pair.register(ServiceConfig::tcp("third", 8081), 0);
    pair.register(ServiceConfig::tcp("fourth", 8082), 0);
    pair.run();
    let outcomes: Vec<_> = pair
        .agent_log
        .iter()
        .filter_map(|a| match a {
            AgentAction::Registered { service, .. } => Some(format!("{} ok", service.name)),
            AgentAction::RegistrationRefused {
                service, reason, ..
            } => Some(format!("{} refused: {reason}", service.name)),
            _ => None,
        })
        .collect();
    assert_eq!(outcomes.len(), 6, "{outcomes:?}");
    assert_eq!(outcomes[..2], ["ssh ok".to_owned(), "dns ok".to_owned()]);
    assert!(
        outcomes[2].contains("\"ssh\" is already registered"),
        "{outcomes:?}"
    );
    assert!(outcomes[3].starts_with("taken refused"), "{outcomes:?}");
    assert_eq!(outcomes[4], "third ok");
    assert!(outcomes[5].contains("limit of 3 services"), "{outcomes:?}");
    assert_eq!(pair.agent.awaiting(), 0);
}

#[test]
fn answers_wait_for_the_registrations_before_them() {
    let now = Instant::now();
    let mut server = authenticated_server(None, TokenScope::default(), now);
    for name in ["a", "b"] {
        let register = Message::register(name, ServiceProtocol::Tcp, 1, 0).unwrap();
        server.handle_frame(register, now);
    }
    let seqs: Vec<u64> = std::iter::from_fn(|| server.poll_action())
        .filter_map(|a| match a {
            ServerAction::Allocate(r) => Some(r.seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, [0, 1]);
    // the second finishes first: nothing goes out until the first is answered
    server.allocated(1, Ok((Uuid::from_u128(11), 30_001)));
    assert_eq!(server.poll_action(), None);
    server.allocated(0, Err(("cannot listen".into(), RegisterRefusal::Later)));
    let answers: Vec<_> = std::iter::from_fn(|| server.poll_action()).collect();
    assert!(matches!(
        answers[0],
        ServerAction::Send(Message::RegisterFail {
            refusal: Some(RegisterRefusal::Later),
            ..
        })
    ));
    assert!(matches!(
        answers[1],
        ServerAction::Send(Message::RegisterOk {
            port: Some(30_001),
            ..
        })
    ));
}

#[test]
fn heartbeats_keep_both_ends_alive_and_silence_drops_them() {
    let mut pair = Pair::new(TOKEN, Some(Features::ALL));
    pair.run();
    for _ in 0..10 {
        pair.advance(5 * SECOND);
    }
    assert!(pair.server.is_open() && pair.agent.is_open());
    let alive = pair
        .server_log
        .iter()
        .filter(|a| matches!(a, ServerAction::ReportAlive))
        .count();
    assert_eq!(alive, 10);

    // the agent stops answering: the server drops it at the timeout, not before
    pair.to_server.clear();
    pair.now += 14 * SECOND;
    pair.server.handle_timeout(pair.now, 0);
    assert!(pair.server.is_open());
    pair.now += 2 * SECOND;
    pair.server.handle_timeout(pair.now, 0);
    pair.run();
    assert_eq!(pair.server_closed(), Some(&CloseReason::HeartbeatTimeout));
    // the agent hears the Disconnect and will reconnect
    let error = pair.agent_closed().unwrap();
    assert!(matches!(error, LinkError::Disconnected { reason } if reason == "heartbeat timeout"));
    assert!(!error.is_fatal());
}

#[test]
fn a_silent_server_is_dropped_by_the_agent() {
    let mut pair = Pair::new(TOKEN, Some(Features::ALL));
    pair.run();
    pair.now += 16 * SECOND;
    pair.agent.handle_timeout(pair.now, 0);
    pair.run();
    assert_eq!(pair.agent_closed(), Some(&LinkError::HeartbeatTimeout));
}

#[test]
fn a_server_that_does_not_read_is_left_however_much_it_sends() {
    let mut pair = Pair::new(TOKEN, Some(Features::ALL));
    pair.run();
    // a write starts and never completes, while the server keeps talking
    pair.agent.write_started(pair.now);
    for _ in 0..7 {
        pair.now += 2 * SECOND;
        pair.to_agent
            .push_back(Message::Heartbeat { timestamp: 1 }.encode());
        pair.agent.handle_timeout(pair.now, 0);
        pair.run();
        assert!(pair.agent.is_open(), "left before the heartbeat timeout");
    }
    pair.now += 2 * SECOND;
    pair.agent.handle_timeout(pair.now, 0);
    pair.run();
    let error = pair.agent_closed().unwrap();
    assert!(
        matches!(error, LinkError::NotReading { .. }) && !error.is_fatal(),
        "{error:?}"
    );
    // a completed write resets the watch; the backlog bound ends it at once
    let mut pair = Pair::new(TOKEN, Some(Features::ALL));
    pair.run();
    pair.agent.write_started(pair.now);
    pair.agent.write_done();
    pair.now += 16 * SECOND;
    pair.to_agent
        .push_back(Message::Heartbeat { timestamp: 1 }.encode());
    pair.run();
    pair.agent.handle_timeout(pair.now, 0);
    pair.run();
    assert!(pair.agent.is_open());
    pair.agent.backlog_exceeded(1 << 20);
    pair.run();
    assert!(matches!(
        pair.agent_closed(),
        Some(LinkError::NotReading { .. })
    ));
}

#[test]
fn no_auth_in_time_closes_both_ends() {
    let now = Instant::now();
    let mut server = ServerSession::new(server_settings(), now);
    server.handle_timeout(now + 9 * SECOND, 0);
    assert!(!server.is_closed());
    server.handle_timeout(now + 10 * SECOND, 0);
    assert_eq!(
        server.poll_action(),
        Some(ServerAction::Close(CloseReason::AuthTimeout))
    );

    let mut agent = AgentSession::new(agent_settings(TOKEN, None), now);
    agent.poll_action();
    agent.handle_timeout(now + 10 * SECOND, 0);
    assert_eq!(
        agent.poll_action(),
        Some(AgentAction::Close(LinkError::AuthTimeout))
    );
}

#[test]
fn anything_before_auth_closes_the_session() {
    let now = Instant::now();
    let mut server = ServerSession::new(server_settings(), now);
    server.handle_frame(Message::Heartbeat { timestamp: 1 }, now);
    assert_eq!(
        server.poll_action(),
        Some(ServerAction::Close(CloseReason::Protocol(
            ProtocolViolation::BeforeAuth(MessageType::Heartbeat)
        )))
    );
    let mut agent = AgentSession::new(agent_settings(TOKEN, None), now);
    agent.poll_action();
    let connect = Message::connect(Uuid::nil(), Uuid::nil(), "x").unwrap();
    agent.handle_frame(connect, now);
    assert!(matches!(
        agent.poll_action(),
        Some(AgentAction::Close(LinkError::Protocol(
            ProtocolViolation::BeforeAuth(_)
        )))
    ));
}

/// A session of each end with `features` negotiated.
fn open_pair(features: Features) -> Pair {
    let mut pair = Pair::new(TOKEN, Some(features));
    pair.run();
    assert!(pair.server.is_open() && pair.agent.is_open());
    pair
}

#[test]
fn a_frame_of_a_feature_not_negotiated_is_refused_on_both_ends() {
    let data = Message::data(Uuid::from_u128(5), bytes::Bytes::from_static(b"x")).unwrap();
    // the agent offered only DATAGRAMS; it sends Data anyway
    let mut pair = open_pair(Features::DATAGRAMS);
    pair.to_server.push_back(data.encode());
    pair.run();
    let expected = ProtocolViolation::NotNegotiated {
        kind: MessageType::Data,
        feature: Features::STREAMS,
    };
    assert_eq!(
        pair.server_closed(),
        Some(&CloseReason::Protocol(expected.clone()))
    );
    // the agent is told why before the socket closes
    assert!(matches!(
        pair.agent_closed(),
        Some(LinkError::Disconnected { reason }) if reason.contains("without the")
    ));

    // and a server that sends Data to an agent that did not negotiate it
    let mut pair = open_pair(Features::DATAGRAMS);
    pair.to_agent.push_back(data.encode());
    pair.run();
    assert_eq!(pair.agent_closed(), Some(&LinkError::Protocol(expected)));
    assert!(
        !pair
            .agent_log
            .iter()
            .any(|a| matches!(a, AgentAction::Socket(_)))
    );
}

#[test]
fn a_message_of_the_other_direction_is_refused() {
    let mut pair = open_pair(Features::ALL);
    pair.to_agent.push_back(
        Message::register("x", ServiceProtocol::Tcp, 1, 0)
            .unwrap()
            .encode(),
    );
    pair.run();
    assert_eq!(
        pair.agent_closed(),
        Some(&LinkError::Protocol(ProtocolViolation::Unexpected(
            MessageType::Register
        )))
    );

    let mut pair = open_pair(Features::ALL);
    let stray = Message::RegisterOk {
        service_id: Uuid::nil(),
        port: None,
    };
    pair.to_server.push_back(stray.encode());
    pair.run();
    assert_eq!(
        pair.server_closed(),
        Some(&CloseReason::Protocol(ProtocolViolation::Unexpected(
            MessageType::RegisterOk
        )))
    );
    // an answer the agent never asked for is a violation too
    let mut pair = open_pair(Features::ALL);
    pair.to_agent.push_back(stray.encode());
    pair.run();
    assert!(matches!(
        pair.agent_closed(),
        Some(LinkError::Protocol(ProtocolViolation::UnpairedReply(_)))
    ));
}

#[test]
fn a_service_with_the_proxy_protocol_is_dialed_with_its_header_first() {
    use crate::proxy_protocol::{ProxyVersion, Transport, header};
    let mut pair = open_pair(Features::ALL);
    pair.register(
        ServiceConfig::tcp("web", 80).with_proxy_protocol(ProxyVersion::V1),
        0,
    );
    pair.run();
    // (the UDP header, v2 over DGRAM, is read back in tests/proxy_protocol.rs)
    let (web, plain) = (Uuid::from_u128(102), Uuid::from_u128(100));
    let visitor = ("192.0.2.7:5000", "198.51.100.1:30001");
    for (id, service) in [(1, web), (2, plain)] {
        (pair.server)
            .open_stream(Uuid::from_u128(id), service, visitor, 0)
            .unwrap();
    }
    pair.run();
    let header_of = |wanted: u128| {
        pair.agent_log.iter().find_map(|a| match a {
            AgentAction::Dial {
                connection_id,
                proxy_header,
                ..
            }
            | AgentAction::OpenFlow {
                connection_id,
                proxy_header,
                ..
            } if *connection_id == Uuid::from_u128(wanted) => Some(proxy_header.clone()),
            _ => None,
        })
    };
    let v1 = header(ProxyVersion::V1, Transport::Stream, visitor.0, visitor.1);
    assert_eq!(header_of(1), Some(Some(v1)));
    assert_eq!(
        header_of(2),
        Some(None),
        "a service without it gets no header"
    );
    // an agent that did not ask for PROXY is not sent the public address
    let without = Features::from_bits(Features::ALL.bits() & !Features::PROXY.bits());
    let mut plain_pair = open_pair(without);
    (plain_pair.server)
        .open_stream(Uuid::from_u128(1), plain, visitor, 0)
        .unwrap();
    plain_pair.run();
    let connect = plain_pair.server_log.iter().find_map(|a| match a {
        ServerAction::Send(Message::Connect { public_addr, .. }) => Some(public_addr.clone()),
        _ => None,
    });
    assert_eq!(connect, Some(String::new()));
}

#[test]
fn visitors_become_streams_or_flows_and_frames_go_to_their_sockets() {
    let mut pair = open_pair(Features::ALL);
    let (tcp, udp) = (Uuid::from_u128(100), Uuid::from_u128(101));
    let (stream, flow) = (Uuid::from_u128(1), Uuid::from_u128(2));
    pair.server
        .open_stream(stream, tcp, ("192.0.2.7:5000", ""), 0)
        .unwrap();
    pair.server
        .open_flow(flow, udp, ("192.0.2.7:5001", ""))
        .unwrap();
    // the per-service limit and an unknown service are refused at the server
    assert!(
        pair.server
            .open_stream(Uuid::from_u128(4), tcp, ("x", ""), 16_384)
            .is_err()
    );
    assert!(
        pair.server
            .open_stream(Uuid::from_u128(5), Uuid::nil(), ("x", ""), 0)
            .is_err()
    );
    // of the tunnel's 8 streams, 2 are kept for its other service
    let share = pair
        .server
        .open_stream(Uuid::from_u128(6), tcp, ("x", ""), 6);
    assert_eq!(
        share,
        Err("service is at its share of the tunnel's streams")
    );
    // a Connect for a service the agent does not have is refused by it
    let unknown = Message::connect(Uuid::from_u128(999), Uuid::from_u128(3), "x").unwrap();
    pair.to_agent.push_back(unknown.encode());
    pair.run();
    assert!(pair.agent_log.iter().any(|a| matches!(
        a,
        AgentAction::Dial { connection_id, service, credit, visitor: Some(_), .. }
            if *connection_id == stream && service == "ssh" && *credit == 32 * 1024
    )));
    assert!(pair.agent_log.iter().any(|a| matches!(
        a,
        AgentAction::OpenFlow { connection_id, service, .. }
            if *connection_id == flow && service.name == "dns"
    )));
    assert!(pair.agent_log.iter().any(|a| matches!(
        a,
        AgentAction::Send(Message::ConnectFail { connection_id, .. })
            if *connection_id == Uuid::from_u128(3)
    )));
    // the agent's data and a datagram reach the server's sockets
    let data = Message::data(stream, bytes::Bytes::from_static(b"hello")).unwrap();
    pair.to_server.push_back(data.encode());
    let datagram = Message::Datagram {
        connection_id: flow,
        data: bytes::Bytes::from_static(b"dns"),
    };
    pair.to_server.push_back(datagram.encode());
    pair.run();
    let sockets: Vec<_> = pair
        .server_log
        .iter()
        .filter_map(|a| match a {
            ServerAction::Socket(action) => Some(action.clone()),
            _ => None,
        })
        .collect();
    let expected = [
        ConnectionAction::Deliver {
            id: stream,
            data: bytes::Bytes::from_static(b"hello"),
        },
        ConnectionAction::Datagram {
            id: flow,
            data: bytes::Bytes::from_static(b"dns"),
        },
    ];
    assert_eq!(sockets, expected);
}

/// An agent's `ConnectFail` for a visitor's stream or flow is reported (the
/// actor logs it, rate-limited); one for a connection the server does not
/// have is not.
#[test]
fn the_agents_refusal_of_a_visitor_is_reported_with_its_reason() {
    let mut pair = open_pair(Features::ALL);
    let (tcp, udp) = (Uuid::from_u128(100), Uuid::from_u128(101));
    let (stream, flow, stranger) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
    pair.server
        .open_stream(stream, tcp, ("192.0.2.7:5000", ""), 0)
        .unwrap();
    pair.server
        .open_flow(flow, udp, ("192.0.2.7:5001", ""))
        .unwrap();
    for id in [stream, flow, stranger] {
        let fail = Message::connect_fail(id, "connection refused (os error 111)").unwrap();
        pair.to_server.push_back(fail.encode());
    }
    pair.run();
    let reported: Vec<_> = (pair.server_log.iter())
        .filter_map(|a| match a {
            ServerAction::VisitorRefused { id, reason } => Some((*id, reason.as_str())),
            _ => None,
        })
        .collect();
    let reason = "connection refused (os error 111)";
    assert_eq!(reported, [(stream, reason), (flow, reason)]);
}

#[test]
fn the_agent_refuses_flows_past_its_own_limit() {
    let mut pair = open_pair(Features::ALL);
    let udp = Uuid::from_u128(101);
    for n in 0..4u128 {
        let connect = Message::connect(udp, Uuid::from_u128(50 + n), "192.0.2.7:53").unwrap();
        pair.to_agent.push_back(connect.encode());
    }
    pair.run();
    let opened = (pair.agent_log.iter())
        .filter(|a| matches!(a, AgentAction::OpenFlow { .. }))
        .count();
    assert_eq!(opened, 3, "max_flows is 3");
    assert!(pair.agent_log.iter().any(|a| matches!(
        a,
        AgentAction::Send(Message::ConnectFail { connection_id, reason, .. })
            if *connection_id == Uuid::from_u128(53) && reason.contains("limit of 3 UDP flows")
    )));
    // a flow that ends makes room
    pair.agent.flow_ended(Uuid::from_u128(50));
    let again = Message::connect(udp, Uuid::from_u128(60), "192.0.2.7:53").unwrap();
    pair.to_agent.push_back(again.encode());
    pair.run();
    let opened = (pair.agent_log.iter())
        .filter(|a| matches!(a, AgentAction::OpenFlow { .. }))
        .count();
    assert_eq!(opened, 4);
}

#[test]
fn an_unregistered_service_frees_its_port() {
    let mut pair = open_pair(Features::ALL);
    let available = pair.ports.available();
    pair.to_server.push_back(
        Message::Unregister {
            service_id: Uuid::from_u128(100),
        }
        .encode(),
    );
    // twice: the second names no service and does nothing
    pair.to_server.push_back(
        Message::Unregister {
            service_id: Uuid::from_u128(100),
        }
        .encode(),
    );
    pair.run();
    assert_eq!(pair.ports.available(), available + 1);
    assert_eq!(pair.server.services(), 1);
}

#[test]
fn the_server_ends_a_session_with_a_reason() {
    let mut pair = open_pair(Features::ALL);
    pair.server
        .disconnect("taken over by a new connection of this agent");
    pair.run();
    assert!(matches!(
        pair.agent_closed(),
        Some(LinkError::Disconnected { reason }) if reason.contains("taken over")
    ));
    assert!(pair.server.is_closed());
}

/// One input of a random interleaving.
#[derive(Debug, Clone)]
enum Step {
    /// The agent asks for a service (index into a fixed list).
    Register(usize),
    /// One frame crosses to the server / to the agent.
    ToServer,
    ToAgent,
    /// Either end's pending actions run.
    ServerActs,
    AgentActs,
    /// Time passes (ms).
    Wait(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..6usize).prop_map(Step::Register),
        Just(Step::ToServer),
        Just(Step::ToAgent),
        Just(Step::ServerActs),
        Just(Step::AgentActs),
        (0..3_000u64).prop_map(Step::Wait),
    ]
}

proptest! {
    /// Whatever the interleaving: every `Register` is answered exactly once
    /// and in order, nothing of a feature not negotiated is sent, a link that
    /// hears heartbeats in time stays up, and an agent that keeps its part
    /// gets every service it asked for (within the limit) or a reason.
    #[test]
    fn random_interleavings_keep_the_rules(steps in prop::collection::vec(step(), 1..200)) {
        let mut pair = Pair::new(TOKEN, Some(Features::STREAMS | Features::ACCESS));
        let names = ["a", "b", "c", "d", "e", "f"];
        for step in steps {
            match step {
                Step::Register(i) => {
                    let local = 1000 + u16::try_from(i).unwrap();
                    pair.register(ServiceConfig::tcp(names[i], local), 0);
                }
                Step::ToServer => {
                    if let Some(frame) = pair.to_server.pop_front() {
                        let now = pair.now;
                        pair.server.handle_frame(decode(&frame), now);
                    }
                }
                Step::ToAgent => {
                    if let Some(frame) = pair.to_agent.pop_front() {
                        let now = pair.now;
                        pair.agent.handle_frame(decode(&frame), now);
                    }
                }
                Step::ServerActs => {
                    while let Some(a) = pair.server.poll_action() { pair.server_did(a); }
                }
                Step::AgentActs => {
                    while let Some(a) = pair.agent.poll_action() { pair.agent_did(a); }
                }
                Step::Wait(ms) => {
                    pair.now += Duration::from_millis(ms);
                    let (now, unix) = (pair.now, pair.unix_ms());
                    pair.server.handle_timeout(now, unix);
                    pair.agent.handle_timeout(now, unix);
                }
            }
        }
        pair.run();
        // nothing of DATAGRAMS went either way
        for action in &pair.server_log {
            if let ServerAction::Send(m) = action {
                prop_assert_ne!(m.message_type(), MessageType::Datagram);
            }
        }
        let sockets = |a: &ServerAction| matches!(a, ServerAction::Socket(_) | ServerAction::Write(_));
        prop_assert!(!pair.server_log.iter().any(sockets), "no data plane was asked for");
        prop_assert_eq!(pair.server.frames_unsent() + pair.agent.frames_unsent(), 0);
        if pair.agent_closed().is_some() || pair.server_closed().is_some() {
            // a link may end on a timeout; then nothing is left waiting
            prop_assert!(pair.agent.is_closed() || pair.server.is_closed());
            return Ok(());
        }
        // every registration answered once, in the order asked
        let answered: Vec<String> = pair.agent_log.iter().filter_map(|a| match a {
            AgentAction::Registered { service, .. }
            | AgentAction::RegistrationRefused { service, .. } => Some(service.name.clone()),
            _ => None,
        }).collect();
        prop_assert_eq!(&answered, &pair.asked);
        prop_assert_eq!(pair.agent.awaiting(), 0);
        // ports given are distinct
        let ports: Vec<u16> = pair.registered().iter().filter_map(|(_, p)| *p).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        prop_assert_eq!(ports.len(), distinct.len());
        prop_assert!(pair.server.services() <= server_settings().max_services);
    }
}

/// Both sessions, each with its connection table, and pretend sockets: the
/// data plane end to end, in memory.
mod data_plane {
    use std::collections::HashMap;

    use bytes::Bytes;

    use super::*;
    use crate::connections::ConnectionKind;
    use crate::session::SocketEvent;

    /// What one side's sockets did and hold.
    #[derive(Default)]
    struct Sockets {
        /// Bytes written to each stream's socket.
        written: HashMap<Uuid, Vec<u8>>,
        /// Bytes each stream's socket has to send.
        unsent: HashMap<Uuid, Vec<u8>>,
        /// What each reader may still read (its credit).
        credit: HashMap<Uuid, u64>,
        shut: Vec<Uuid>,
        reset: Vec<Uuid>,
        datagrams: Vec<(Uuid, Bytes)>,
        forgotten_flows: Vec<Uuid>,
        /// The sockets take nothing: delivered bytes wait here, no credit goes back.
        stalled: bool,
        held: HashMap<Uuid, Vec<u8>>,
    }

    struct Tunnel {
        pair: Pair,
        server: Sockets,
        agent: Sockets,
    }

    impl Tunnel {
        fn new() -> Self {
            let mut pair = Pair::new(TOKEN, Some(Features::ALL));
            pair.run();
            assert!(pair.agent.is_open());
            assert_eq!(pair.server.agent_window(), 128 * 1024);
            Self {
                pair,
                server: Sockets::default(),
                agent: Sockets::default(),
            }
        }

        /// A visitor reaches service `service_id` (100: tcp ssh, 101: udp dns).
        fn visitor(&mut self, service_id: u128, id: u128) -> Uuid {
            let (id, service) = (Uuid::from_u128(id), Uuid::from_u128(service_id));
            if service_id == 101 {
                self.pair
                    .server
                    .open_flow(id, service, ("192.0.2.7:4000", ""))
                    .unwrap();
            } else {
                let window = self.pair.server.agent_window();
                self.pair
                    .server
                    .open_stream(id, service, ("192.0.2.7:4000", ""), 0)
                    .unwrap();
                self.server.credit.insert(id, u64::from(window));
            }
            id
        }

        /// Runs both ends and their sockets until nothing moves.
        fn pump(&mut self) {
            for _ in 0..100_000 {
                let mut busy = false;
                while let Some(action) = self.pair.agent.poll_action() {
                    busy = true;
                    self.agent_did(action);
                }
                while let Some(action) = self.pair.server.poll_action() {
                    busy = true;
                    self.server_did(action);
                }
                busy |= self.read_sockets();
                let now = self.pair.now;
                if let Some(frame) = self.pair.to_server.pop_front() {
                    busy = true;
                    self.pair.server.handle_bytes(Bytes::from(frame), now);
                }
                if let Some(frame) = self.pair.to_agent.pop_front() {
                    busy = true;
                    self.pair.agent.handle_bytes(&frame, now);
                }
                if !busy {
                    return;
                }
            }
            panic!("no quiet point");
        }

        fn agent_did(&mut self, action: AgentAction) {
            if matches!(
                action,
                AgentAction::Dial { .. } | AgentAction::OpenFlow { .. }
            ) {
                self.pair.agent_log.push(action.clone());
            }
            match action {
                AgentAction::Dial {
                    connection_id,
                    credit,
                    ..
                } => {
                    self.agent.credit.insert(connection_id, u64::from(credit));
                    self.pair.agent.dialed(connection_id);
                }
                AgentAction::OpenFlow { connection_id, .. } => {
                    self.pair.agent.flow_started(connection_id);
                }
                AgentAction::Socket(socket) => self.socket(false, socket),
                AgentAction::Write(frame) => {
                    self.pair.to_server.push_back(frame.into_bytes().to_vec())
                }
                other => self.pair.agent_did(other),
            }
        }

        fn server_did(&mut self, action: ServerAction) {
            match action {
                ServerAction::Socket(socket) => self.socket(true, socket),
                ServerAction::Write(frame) => {
                    self.pair.to_agent.push_back(frame.into_bytes().to_vec())
                }
                other => self.pair.server_did(other),
            }
        }

        /// A socket action of the server's (true) or the agent's session.
        fn socket(&mut self, server: bool, action: ConnectionAction) {
            let sockets = if server {
                &mut self.server
            } else {
                &mut self.agent
            };
            let delivered = match action {
                ConnectionAction::Deliver { id, data } if sockets.stalled => {
                    sockets.held.entry(id).or_default().extend_from_slice(&data);
                    None
                }
                ConnectionAction::Deliver { id, data } => {
                    sockets
                        .written
                        .entry(id)
                        .or_default()
                        .extend_from_slice(&data);
                    Some(SocketEvent::Delivered {
                        id,
                        len: data.len(),
                    })
                }
                ConnectionAction::Credit { id, increment } => {
                    *sockets.credit.entry(id).or_default() += u64::from(increment);
                    None
                }
                ConnectionAction::ShutdownWrite { id } => {
                    sockets.shut.push(id);
                    None
                }
                ConnectionAction::Reset { id, .. } => {
                    sockets.reset.push(id);
                    None
                }
                ConnectionAction::Datagram { id, data } => {
                    sockets.datagrams.push((id, data));
                    None
                }
                ConnectionAction::ForgetFlow { id } => {
                    sockets.forgotten_flows.push(id);
                    None
                }
                _ => None,
            };
            if let Some(event) = delivered {
                self.event(server, event);
            }
        }

        fn event(&mut self, server: bool, event: SocketEvent) {
            if server {
                self.pair.server.socket_event(event);
            } else {
                self.pair.agent.socket_event(event);
            }
        }

        /// Each socket reads what it has, within its credit, as a reader frames it.
        fn read_sockets(&mut self) -> bool {
            let mut reads = Vec::new();
            for server in [true, false] {
                let sockets = if server {
                    &mut self.server
                } else {
                    &mut self.agent
                };
                for (id, unsent) in &mut sockets.unsent {
                    let credit = sockets.credit.get(id).copied().unwrap_or(0);
                    let n = (credit as usize).min(unsent.len()).min(16 * 1024);
                    if n == 0 {
                        continue;
                    }
                    let chunk = Bytes::from(unsent.drain(..n).collect::<Vec<u8>>());
                    sockets.credit.insert(*id, credit - n as u64);
                    let frame = Message::data(*id, chunk).unwrap().to_bytes();
                    reads.push((
                        server,
                        SocketEvent::Read {
                            id: *id,
                            frame,
                            len: n,
                        },
                    ));
                }
            }
            let busy = !reads.is_empty();
            for (server, event) in reads {
                self.event(server, event);
            }
            busy
        }

        fn send(&mut self, server: bool, id: Uuid, data: &[u8]) {
            let sockets = if server {
                &mut self.server
            } else {
                &mut self.agent
            };
            sockets
                .unsent
                .entry(id)
                .or_default()
                .extend_from_slice(data);
        }

        /// The agent's sockets take what they held.
        fn unstall_agent(&mut self) {
            self.agent.stalled = false;
            for (id, held) in std::mem::take(&mut self.agent.held) {
                let len = held.len();
                self.agent
                    .written
                    .entry(id)
                    .or_default()
                    .extend_from_slice(&held);
                self.pair
                    .agent
                    .socket_event(SocketEvent::Delivered { id, len });
            }
        }

        fn streams(&self) -> (usize, usize) {
            let unsent = self.pair.server.frames_unsent() + self.pair.agent.frames_unsent();
            assert_eq!(unsent, 0, "every frame built and announced");
            (self.pair.server.streams(), self.pair.agent.streams())
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn streams_carry_bytes_both_ways_half_close_and_leave_nothing_behind() {
        let mut t = Tunnel::new();
        let ids: Vec<Uuid> = (1..=3).map(|n| t.visitor(100, n)).collect();
        t.pump();
        assert_eq!(t.streams(), (3, 3));
        let mut expected = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let (up, down) = (pattern(300_000 + i * 777, 1), pattern(200_000 + i, 2));
            t.send(true, *id, &up);
            t.send(false, *id, &down);
            expected.push((*id, up, down));
        }
        t.pump();
        for (id, up, down) in &expected {
            assert_eq!(t.agent.written[id], *up, "visitor to service");
            assert_eq!(t.server.written[id], *down, "service to visitor");
        }
        // the visitor half-closes: the service's side shuts its write half,
        // and can still answer before it closes too
        t.event(true, SocketEvent::ReadEof { id: ids[0] });
        t.pump();
        assert_eq!(t.agent.shut, [ids[0]]);
        t.send(false, ids[0], b"late answer");
        t.pump();
        assert!(t.server.written[&ids[0]].ends_with(b"late answer"));
        t.event(false, SocketEvent::ReadEof { id: ids[0] });
        t.pump();
        assert_eq!(t.streams(), (2, 2));
        // a reset ends the stream on both sides at once
        t.event(true, SocketEvent::Failed { id: ids[1] });
        t.pump();
        assert_eq!(t.agent.reset, [ids[1]]);
        for id in &ids[2..] {
            t.event(true, SocketEvent::ReadEof { id: *id });
            t.event(false, SocketEvent::ReadEof { id: *id });
        }
        t.pump();
        assert_eq!(t.streams(), (0, 0), "entries leaked");
        assert!(t.server.reset.is_empty());
    }

    #[test]
    fn a_window_holds_the_sender_until_the_receiver_writes() {
        let mut t = Tunnel::new();
        let id = t.visitor(100, 9);
        t.pump();
        // the agent's socket takes nothing: no more than the window it
        // announced crosses, and nothing is reset
        t.agent.stalled = true;
        let data = pattern(1 << 20, 3);
        t.send(true, id, &data);
        t.pump();
        assert_eq!(t.agent.held[&id].len(), 128 * 1024);
        assert_eq!(t.server.unsent[&id].len(), (1 << 20) - 128 * 1024);
        // the socket drains: the rest crosses, in order
        t.unstall_agent();
        t.pump();
        assert_eq!(t.agent.written[&id], data);
        assert!(t.agent.reset.is_empty() && t.server.reset.is_empty());
    }

    #[test]
    fn a_read_past_the_credit_resets_the_stream_instead_of_losing_bytes() {
        let mut t = Tunnel::new();
        let id = t.visitor(100, 11);
        t.pump();
        // a reader that ignores its credit: the stream is reset both ways,
        // never carried on short
        let frame = Message::data(id, Bytes::from(vec![7; 200 * 1024 - 1]))
            .map(|_| ())
            .err();
        assert!(frame.is_some(), "a frame holds at most 64 KiB");
        for _ in 0..3 {
            let chunk = Bytes::from(vec![7u8; 60_000]);
            let frame = Message::data(id, chunk).unwrap().to_bytes();
            t.event(
                true,
                SocketEvent::Read {
                    id,
                    frame,
                    len: 60_000,
                },
            );
        }
        t.pump();
        assert_eq!(t.server.reset, [id]);
        assert_eq!(t.agent.reset, [id]);
        assert_eq!(
            t.agent.written[&id].len(),
            120_000,
            "only what the credit allowed"
        );
        assert_eq!(t.streams(), (0, 0));
    }

    #[test]
    fn udp_flows_carry_datagrams_whole_and_end_with_an_abort() {
        let mut t = Tunnel::new();
        let flow = t.visitor(101, 20);
        t.pump();
        for n in 0..5u8 {
            let datagram = Message::Datagram {
                connection_id: flow,
                data: Bytes::from(vec![n; 512 + usize::from(n)]),
            };
            t.pair.to_agent.push_back(datagram.encode());
        }
        t.pump();
        let sizes: Vec<usize> = t.agent.datagrams.iter().map(|(_, d)| d.len()).collect();
        assert_eq!(sizes, [512, 513, 514, 515, 516]);
        // the agent's flow idles out: the server forgets it too
        t.pair.agent.flow_ended(flow);
        t.pump();
        assert_eq!(t.server.forgotten_flows, [flow]);
        assert!(!t.pair.server.is_flow(flow));
        assert!(t.pair.server.close_connections().is_empty());
        assert!(t.pair.agent.close_connections().is_empty());
    }

    #[test]
    fn access_streams_are_relayed_without_state_and_end_both_ways() {
        // agent B's access client opens a stream to agent A's "ssh" through
        // the server: here the server's side of agent A's link
        let mut t = Tunnel::new();
        let id = Uuid::from_u128(30);
        t.pair
            .server
            .relay_to_agent(
                id,
                ("ssh", "10.0.0.9:22"),
                ServiceProtocol::Tcp,
                Default::default(),
            )
            .unwrap();
        t.pump();
        // agent A grants its window and dials the allowed target at once
        let dial = t.pair.agent_log.iter().find_map(|a| match a {
            AgentAction::Dial {
                connection_id,
                address,
                credit,
                visitor: None,
                ..
            } if *connection_id == id => Some((address.clone(), *credit)),
            _ => None,
        });
        assert_eq!(dial, Some(("10.0.0.9:22".to_owned(), 0)));
        let relayed: Vec<MessageType> = (t.pair.server_log.iter())
            .filter_map(|a| match a {
                ServerAction::Relay { id: r, kind, .. } if *r == id => Some(*kind),
                _ => None,
            })
            .collect();
        assert_eq!(relayed, [MessageType::Window, MessageType::ConnectAck]);
        // the client's side: its Window and bytes arrive from the other channel
        let window = Message::window(id, 64 * 1024).unwrap();
        let frame = window.to_bytes();
        assert_eq!(
            t.pair
                .server
                .relay_from_other(id, MessageType::Window, None, frame),
            Some(false)
        );
        let data = Message::data(id, Bytes::from_static(b"ssh hello"))
            .unwrap()
            .to_bytes();
        t.pair
            .server
            .relay_from_other(id, MessageType::Data, None, data);
        t.pump();
        assert_eq!(t.agent.written[&id], b"ssh hello");
        // both ends' eof: the relay is over on the server
        t.event(false, SocketEvent::ReadEof { id });
        t.pump();
        let eof = Message::Close {
            connection_id: id,
            kind: CloseKind::Eof,
        };
        let last = t.pair.server.relay_from_other(
            id,
            MessageType::Close,
            Some(CloseKind::Eof),
            eof.to_bytes(),
        );
        assert_eq!(last, Some(true));
        assert!(t.pair.server.close_connections().is_empty());
        // a service the agent does not have is refused by the agent
        t.pair
            .server
            .relay_to_agent(
                Uuid::from_u128(31),
                ("nope", ""),
                ServiceProtocol::Tcp,
                Default::default(),
            )
            .unwrap();
        t.pump();
        assert!(t.pair.server_log.iter().any(|a| matches!(
            a,
            ServerAction::Relay {
                kind: MessageType::ConnectFail,
                last: true,
                ..
            }
        )));
        assert_eq!(t.pair.agent.close_connections().len(), 0);
        let _ = ConnectionKind::Relay;
    }

    #[test]
    fn a_peers_udp_flow_reaches_the_agent_as_a_visitors_flow() {
        // a peer server forwards a UDP visitor: an Open of a flow, with the
        // visitor's address, from the peer link
        let mut t = Tunnel::new();
        let id = Uuid::from_u128(40);
        t.pair
            .server
            .relay_to_agent(
                id,
                ("dns", "198.51.100.4:5353"),
                ServiceProtocol::Udp,
                Default::default(),
            )
            .unwrap();
        t.pump();
        let opened = t.pair.agent_log.iter().any(|a| {
            matches!(a, AgentAction::OpenFlow { connection_id, client_addr, .. }
                if *connection_id == id && client_addr == "198.51.100.4:5353")
        });
        assert!(opened, "the agent opens a flow for the forwarded visitor");
        // the peer's datagrams cross as they came
        let query = Message::datagram(id, Bytes::from_static(b"query")).unwrap();
        let passed =
            (t.pair.server).relay_from_other(id, MessageType::Datagram, None, query.to_bytes());
        assert_eq!(passed, Some(false));
        t.pump();
        assert_eq!(t.agent.datagrams, [(id, Bytes::from_static(b"query"))]);
        // the peer's flow idles out: an abort ends the relay
        let abort = Message::Close {
            connection_id: id,
            kind: CloseKind::Abort,
        };
        let last = (t.pair.server).relay_from_other(
            id,
            MessageType::Close,
            Some(CloseKind::Abort),
            abort.to_bytes(),
        );
        assert_eq!(last, Some(true));
        // a UDP service the agent does not have is refused at once
        let unknown = (t.pair.server).relay_to_agent(
            Uuid::from_u128(41),
            ("nope", "198.51.100.4:1"),
            ServiceProtocol::Udp,
            Default::default(),
        );
        assert!(unknown.is_err());
    }

    #[test]
    fn a_flow_opened_by_open_says_so_on_the_wire_and_is_found_by_protocol() {
        let mut t = Tunnel::new();
        let id = Uuid::from_u128(50);
        t.pair
            .agent
            .open_access_flow(
                id,
                "dns",
                ("203.0.113.9:7".into(), "198.51.100.1:53".into()),
            )
            .unwrap();
        t.pump();
        let find = t.pair.server_log.iter().find_map(|a| match a {
            ServerAction::FindService {
                id: found,
                service,
                target,
                protocol,
                visitor,
                ..
            } if *found == id => {
                // an address claimed by a client that is not a peer server
                // is not passed on (it would forge the service's PROXY header)
                assert_eq!(visitor, &(String::new(), String::new()));
                Some((service.clone(), target.clone(), *protocol))
            }
            _ => None,
        });
        let expected = (
            "dns".to_owned(),
            "203.0.113.9:7".to_owned(),
            ServiceProtocol::Udp,
        );
        assert_eq!(find, Some(expected));
        // a server that did not announce ACCESS_UDP is never sent one
        let older = Features::STREAMS | Features::DATAGRAMS | Features::ACCESS;
        let mut old = Pair::new(TOKEN, Some(older));
        old.run();
        assert!(old.agent.is_open());
        let refused = old
            .agent
            .open_access_flow(Uuid::from_u128(51), "dns", Default::default());
        assert!(refused.is_err());
    }
}

#[test]
fn health_reports_reach_the_replica_only_for_a_registered_service() {
    let mut pair = open_pair(Features::ALL);
    let (registered, stranger) = (Uuid::from_u128(100), Uuid::from_u128(999));
    for (id, healthy) in [(registered, false), (stranger, false), (registered, true)] {
        pair.to_server
            .push_back(Message::health(id, healthy).encode());
    }
    pair.run();
    let reported: Vec<_> = (pair.server_log.iter())
        .filter_map(|a| match a {
            ServerAction::ServiceHealth {
                service_id,
                healthy,
            } => Some((*service_id, *healthy)),
            _ => None,
        })
        .collect();
    assert_eq!(reported, [(registered, false), (registered, true)]);
    assert!(pair.server.is_open());

    // not negotiated: a protocol error; and never from the server
    let mut pair = open_pair(Features::STREAMS | Features::DATAGRAMS);
    pair.to_server
        .push_back(Message::health(registered, false).encode());
    pair.run();
    assert!(matches!(
        pair.server_closed(),
        Some(CloseReason::Protocol(
            ProtocolViolation::NotNegotiated { .. }
        ))
    ));
    let mut pair = open_pair(Features::ALL);
    pair.to_agent
        .push_back(Message::health(registered, false).encode());
    pair.run();
    assert!(matches!(
        pair.agent_closed(),
        Some(LinkError::Protocol(ProtocolViolation::Unexpected(
            MessageType::Health
        )))
    ));
}
