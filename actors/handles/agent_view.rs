//! `AgentView`: what an agent knows about its session, shared between its
//! connection actor (which writes it) and whoever asks (`TunnelAgent::status`,
//! the agent's admin endpoints). Not an actor: a small locked record.

use crate::actors::forwarded_connection::SharedBandwidth;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use uuid::Uuid;

use crate::accounting::Counters;
use crate::config::ServiceConfig;
use crate::protocol::ServiceProtocol;
use crate::status::{ServiceInfo, TunnelState};

/// A service the server published for this agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedService {
    /// The service's name.
    pub name: String,
    /// TCP or UDP.
    pub protocol: ServiceProtocol,
    /// What the agent dials for it.
    pub local: String,
    /// Its public port on the server.
    pub public_port: u16,
    /// Where visitors reach it: the server's host and the public port.
    pub public_addr: String,
}

/// Called once per service the server publishes (after every reconnect too).
pub type PublishedCallback = Arc<dyn Fn(&PublishedService) + Send + Sync>;

#[derive(Debug)]
struct Session {
    tunnel_id: Uuid,
    since: SystemTime,
    services: Vec<ServiceInfo>,
}

/// The agent's session and per-service counters (kept across reconnects).
#[derive(Debug)]
pub(crate) struct AgentView {
    session: Mutex<Option<Session>>,
    state: Mutex<TunnelState>,
    /// Why the link last ended, and whether retrying soon cannot fix it.
    last_error: Mutex<Option<(String, bool)>>,
    /// The services this link's server refuses now, by name: why, and
    /// whether it said asking again soon cannot help.
    refusals: Mutex<std::collections::BTreeMap<String, (String, bool)>>,
    /// By service name; shared by the agent's links, and grown by the
    /// services added while it runs.
    service_counters: Arc<Mutex<HashMap<String, Arc<Counters>>>>,
    /// The bandwidth limits of the services that have one, by name, shared
    /// by the agent's links (a service's limit covers all its streams).
    bandwidths: Arc<Mutex<HashMap<String, SharedBandwidth>>>,
}

impl AgentView {
    /// A view with counters for each configured service.
    pub(crate) fn new(services: &[ServiceConfig]) -> Self {
        let service_counters = services
            .iter()
            .map(|s| (s.name.clone(), Arc::new(Counters::new())))
            .collect();
        let view = Self {
            session: Mutex::new(None),
            state: Mutex::new(TunnelState::Connecting),
            last_error: Mutex::new(None),
            refusals: Mutex::default(),
            service_counters: Arc::new(Mutex::new(service_counters)),
            bandwidths: Arc::default(),
        };
        services.iter().for_each(|s| view.set_bandwidth(s));
        view
    }

    /// Service `service`'s bandwidth limit from now on (none: no limit).
    fn set_bandwidth(&self, service: &ServiceConfig) {
        let Ok(mut bandwidths) = self.bandwidths.lock() else {
            return;
        };
        match service.bandwidth {
            Some(rate) => {
                let bucket = crate::bandwidth::Bandwidth::new(rate, std::time::Instant::now());
                bandwidths.insert(service.name.clone(), Arc::new(Mutex::new(bucket)));
            }
            None => {
                bandwidths.remove(&service.name);
            }
        }
    }

    /// Service `name`'s bandwidth limit, if it has one.
    pub(crate) fn bandwidth(&self, name: &str) -> Option<SharedBandwidth> {
        self.bandwidths.lock().ok()?.get(name).cloned()
    }

    /// A view of another link of the same agent: its own session and
    /// state, the same service counters (a service's traffic is counted
    /// over every link).
    pub(crate) fn another_link(&self) -> Self {
        Self {
            session: Mutex::new(None),
            state: Mutex::new(TunnelState::Connecting),
            last_error: Mutex::new(None),
            refusals: Mutex::default(),
            service_counters: self.service_counters.clone(),
            bandwidths: self.bandwidths.clone(),
        }
    }

    /// The counters of service `name`, if configured.
    pub(crate) fn counters(&self, name: &str) -> Option<Arc<Counters>> {
        let counters = self.service_counters.lock().ok()?;
        counters.get(name).cloned()
    }

    /// Service `service` was added (or changed) while the agent runs: it
    /// gets counters, and its bandwidth limit.
    pub(crate) fn add_service(&self, service: &ServiceConfig) {
        if let Ok(mut counters) = self.service_counters.lock() {
            counters.entry(service.name.clone()).or_default();
        }
        self.set_bandwidth(service);
    }

    /// Service `name` was withdrawn: no longer shown as registered.
    pub(crate) fn withdrawn(&self, name: &str) {
        if let Ok(mut session) = self.session.lock()
            && let Some(session) = session.as_mut()
        {
            session.services.retain(|s| s.name != name);
        }
    }

    /// A session authenticated.
    pub(crate) fn connected(&self, tunnel_id: Uuid) {
        self.set(Some(Session {
            tunnel_id,
            since: SystemTime::now(),
            services: Vec::new(),
        }));
    }

    /// The session ended.
    pub(crate) fn disconnected(&self) {
        self.set(None);
    }

    /// The server registered `service` as `id` on public `port`.
    pub(crate) fn registered(&self, id: Uuid, service: &ServiceConfig, port: u16) {
        if let Ok(mut session) = self.session.lock()
            && let Some(session) = session.as_mut()
        {
            session.services.push(ServiceInfo {
                id,
                name: service.name.clone(),
                protocol: service.protocol,
                port,
                stats: Default::default(),
                flows: Vec::new(),
                healthy: true,
                visitors: crate::visitor_rules::VisitorRules::default()
                    .and(&service.visitor_rules()),
                visitor_rate: service.visitor_rate,
                bandwidth: service.bandwidth,
            });
        }
    }

    /// Where the link stands.
    pub(crate) fn state(&self) -> TunnelState {
        self.state
            .lock()
            .map_or(TunnelState::Connecting, |s| s.clone())
    }

    /// Moves the link to `state`.
    pub(crate) fn set_state(&self, state: TunnelState) {
        if let Ok(mut current) = self.state.lock() {
            *current = state;
        }
    }

    /// The server refused service `name` (`lasting`: for a reason asking
    /// again soon cannot fix).
    pub(crate) fn refused(&self, name: &str, reason: &str, lasting: bool) {
        if let Ok(mut refusals) = self.refusals.lock() {
            refusals.insert(name.to_owned(), (reason.to_owned(), lasting));
        }
    }

    /// Service `name` is registered, or no longer asked for.
    pub(crate) fn refusal_ended(&self, name: &str) {
        if let Ok(mut refusals) = self.refusals.lock() {
            refusals.remove(name);
        }
    }

    /// The services refused now.
    /// Where this link, the `connection`th to `url`, stands, as `/status`
    /// reports it.
    pub(crate) fn link_status(&self, url: &str, connection: usize) -> crate::status::LinkStatus {
        let session = self.session();
        crate::status::LinkStatus {
            server_url: url.to_owned(),
            connection,
            connected: session.is_some(),
            state: self.state(),
            connected_since: session.as_ref().map(|s| s.1),
            services: session.map(|s| s.2).unwrap_or_default(),
            refused: self.refusals(),
        }
    }

    pub(crate) fn refusals(&self) -> Vec<crate::status::RefusedService> {
        let Ok(refusals) = self.refusals.lock() else {
            return Vec::new();
        };
        (refusals.iter())
            .map(|(name, (reason, lasting))| crate::status::RefusedService {
                name: name.clone(),
                reason: reason.clone(),
                lasting: *lasting,
            })
            .collect()
    }

    /// Records why the link ended; reported with the next `Reconnecting`.
    pub(crate) fn link_failed(&self, error: impl Into<String>) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some((error.into(), false));
        }
    }

    /// Records why the link ended, a fault retrying soon cannot fix.
    pub(crate) fn link_failed_for_good(&self, error: impl Into<String>) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some((error.into(), true));
        }
    }

    /// Why the link ended, if retrying soon cannot fix it.
    pub(crate) fn permanent_failure(&self) -> Option<String> {
        let last = self.last_error.lock().ok()?;
        last.as_ref()
            .filter(|(_, permanent)| *permanent)
            .map(|(e, _)| e.clone())
    }

    /// The next attempt is `delay` away.
    pub(crate) fn reconnecting(&self, delay: std::time::Duration) {
        let (last_error, permanent) = self
            .last_error
            .lock()
            .ok()
            .and_then(|mut e| e.take())
            .unwrap_or_else(|| ("connection ended".to_owned(), false));
        self.set_state(TunnelState::Reconnecting {
            last_error,
            permanent,
            next_attempt: SystemTime::now() + delay,
        });
    }

    /// The session as reported: tunnel id, since when, services with live counters.
    pub(crate) fn session(&self) -> Option<(Uuid, SystemTime, Vec<ServiceInfo>)> {
        let session = self.session.lock().ok()?;
        let session = session.as_ref()?;
        let services = session
            .services
            .iter()
            .map(|s| ServiceInfo {
                stats: self
                    .counters(&s.name)
                    .map(|c| c.snapshot())
                    .unwrap_or_default(),
                ..s.clone()
            })
            .collect();
        Some((session.tunnel_id, session.since, services))
    }

    fn set(&self, session: Option<Session>) {
        if let Ok(mut current) = self.session.lock() {
            *current = session;
        }
    }
}

/// `host:port` of a public port on the server of `server_url` (IPv6 in brackets).
pub(crate) fn public_addr(server_url: &str, port: u16) -> String {
    let host = server_url
        .parse::<awc::http::Uri>()
        .ok()
        .and_then(|uri| uri.host().map(str::to_owned))
        .unwrap_or_else(|| "server".to_owned());
    format!("{host}:{port}")
}
