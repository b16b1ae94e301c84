//! `TunnelAgent` (the seed's type): the public handle of an agent. Not an
//! actor: `run()` starts one `AgentConnection` per server (a link), each
//! under an actix `Supervisor` of its own on the library's runtime thread,
//! and waits until the agent is stopped or every link met a fault that
//! retrying cannot fix (the server refused the token).

use std::sync::{Arc, Mutex};

use actix::{Addr, ArbiterHandle};
use uuid::Uuid;

use super::agent_view::{AgentView, PublishedCallback};
use crate::accounting::{Counters, Snapshot};
use crate::actors::agent_connection::{
    AddService, AgentConnection, OpenStream, ProbeService, RemoveService, StopAgent,
};
use crate::actors::io::{admin, runtime};
use crate::config::{ServiceConfig, TunnelClientConfig};
use crate::status::AgentStatus;
use crate::{Result, TunnelError};
use std::net::SocketAddr;

mod links;

/// Decides whether to accept a visitor: `(service_id, connection_id, client_addr) -> accept`.
pub type ConnectionCallback = Arc<dyn Fn(Uuid, Uuid, String) -> bool + Send + Sync>;

/// A tunnel agent: dials out to a server (or to each of several),
/// registers its services, forwards visitors to them, and reconnects on
/// exponential backoff.
#[derive(Clone)]
pub struct TunnelAgent {
    config: TunnelClientConfig,
    client_id: Uuid,
    on_connection: Option<ConnectionCallback>,
    on_published: Option<PublishedCallback>,
    counters: Arc<Counters>,
    /// The first link's view (the one `status()` leads with).
    view: Arc<AgentView>,
    /// Every link's server and view, the first one included.
    links: Arc<Vec<(String, Arc<AgentView>)>>,
    control: Arc<Mutex<Control>>,
    /// The services published now (see [`TunnelAgent::add_service`]).
    services: Arc<Mutex<Vec<ServiceConfig>>>,
}

#[derive(Default)]
struct Control {
    /// The link actors, each with its link's number (the order they
    /// started in is not the links' order: the extra ones start on threads
    /// of their own).
    addrs: Vec<(usize, Addr<AgentConnection>)>,
    /// The threads of the extra links to a server (`connections`).
    threads: Vec<ArbiterHandle>,
    stop_requested: bool,
}

impl TunnelAgent {
    /// An agent for `config`; its client id (from the config, or drawn now) is kept for its life.
    #[must_use]
    pub fn new(config: TunnelClientConfig) -> Self {
        let client_id = config.client_id.unwrap_or_else(Uuid::new_v4);
        let view = Arc::new(AgentView::new(&config.services));
        let each_server = |url: String| std::iter::repeat_n(url, config.connections.max(1));
        let links = (config
            .server_urls()
            .into_iter()
            .flat_map(each_server)
            .enumerate())
        .map(|(i, url)| {
            let link_view = if i == 0 {
                view.clone()
            } else {
                Arc::new(view.another_link())
            };
            (url, link_view)
        })
        .collect();
        Self {
            client_id,
            on_connection: None,
            on_published: None,
            counters: Arc::new(Counters::new()),
            view,
            links: Arc::new(links),
            control: Arc::default(),
            services: Arc::new(Mutex::new(config.services.clone())),
            config,
        }
    }

    /// Sets the callback told of each service the server publishes, with its
    /// public address (after every reconnect too; once per server, by the
    /// first of the links to it).
    #[must_use]
    pub fn on_published(mut self, callback: PublishedCallback) -> Self {
        self.on_published = Some(callback);
        self
    }

    /// The agent's session and services, with live counters.
    pub fn status(&self) -> AgentStatus {
        let session = self.view.session();
        let (tunnel_id, since, services) = match session {
            Some((id, since, services)) => (Some(id), Some(since), services),
            None => (None, None, Vec::new()),
        };
        let server_url =
            (self.links.first()).map_or_else(|| self.config.server_url.clone(), |l| l.0.clone());
        AgentStatus {
            server_url,
            client_id: self.client_id,
            connected: tunnel_id.is_some(),
            state: self.view.state(),
            tunnel_id,
            connected_since: since,
            services,
            stats: self.counters.snapshot(),
            links: (self.links.iter().enumerate())
                .map(|(i, (url, view))| view.link_status(url, self.connection_number(i)))
                .collect(),
            refused: self.view.refusals(),
        }
    }

    /// Opens an access stream through the first server; false if the agent
    /// is not running.
    pub(crate) fn open_stream(&self, open: OpenStream) -> bool {
        self.connection().map(|addr| addr.do_send(open)).is_some()
    }

    /// Whether TCP service `service` exists on the (first) server and this
    /// agent's token may open streams to it; `Ok` too when the server cannot
    /// be asked (it is older).
    pub(crate) async fn probe_service(&self, service: &str) -> std::result::Result<(), String> {
        let Some(link) = self.connection() else {
            return Err("no access link to the server yet".to_owned());
        };
        let asked = link.send(ProbeService(service.to_owned()));
        match tokio::time::timeout(std::time::Duration::from_secs(10), asked).await {
            Ok(answer) => answer.unwrap_or_else(|_| Err("the access link stopped".to_owned())),
            Err(_) => Err("the server did not answer within 10 s".to_owned()),
        }
    }

    /// The agent's (first) link actor, while it runs.
    pub(crate) fn connection(&self) -> Option<Addr<AgentConnection>> {
        let control = self.control.lock().ok()?;
        let first = control.addrs.iter().min_by_key(|(i, _)| *i);
        first.map(|(_, addr)| addr.clone())
    }

    /// Publishes `service` while the agent runs, on every server it is
    /// linked to (now if linked, else at the next connection) and after
    /// every reconnect; a service of that name is replaced (withdrawn,
    /// then published anew) unless it is the same. A host that starts
    /// containers publishes them this way.
    pub fn add_service(&self, service: ServiceConfig) -> Result<()> {
        service.validate()?;
        let replaced = {
            let mut services = self.services.lock().map_err(|_| TunnelError::Shutdown)?;
            match services.iter().position(|s| s.name == service.name) {
                Some(i) if services[i] == service => return Ok(()),
                Some(i) => Some(std::mem::replace(&mut services[i], service.clone())),
                None => {
                    services.push(service.clone());
                    None
                }
            }
        };
        for (_, view) in self.links.iter() {
            view.add_service(&service);
        }
        self.each_link(|addr| {
            if replaced.is_some() {
                addr.do_send(RemoveService(service.name.clone()));
            }
            addr.do_send(AddService(service.clone()));
        });
        Ok(())
    }

    /// Withdraws service `name` while the agent runs: unregistered on every
    /// server, its open streams and flows end (the others are untouched).
    /// False if it was not published.
    pub fn remove_service(&self, name: &str) -> bool {
        let removed = self.services.lock().is_ok_and(|mut services| {
            let before = services.len();
            services.retain(|s| s.name != name);
            services.len() < before
        });
        if removed {
            self.each_link(|addr| addr.do_send(RemoveService(name.to_owned())));
        }
        removed
    }

    /// The services it publishes now.
    pub fn services(&self) -> Vec<ServiceConfig> {
        self.services.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn each_link(&self, send: impl Fn(&Addr<AgentConnection>)) {
        if let Ok(control) = self.control.lock() {
            control.addrs.iter().map(|(_, addr)| addr).for_each(send);
        }
    }

    /// Traffic of service `name` since the agent started (all sessions).
    pub fn service_stats(&self, name: &str) -> Option<Snapshot> {
        self.view.counters(name).map(|c| c.snapshot())
    }

    /// Serves `/healthz`, `/status` and `/metrics` about this agent on
    /// `listen`; must run inside an actix `System`. Runs until the returned
    /// server is stopped.
    pub fn serve_admin(&self, listen: &[SocketAddr]) -> std::io::Result<actix_web::dev::Server> {
        admin::start(listen, Arc::new(self.clone()))
    }

    /// [`TunnelAgent::serve_admin`], guarded by `access` (bearer tokens).
    pub fn serve_admin_guarded(
        &self,
        listen: &[SocketAddr],
        access: crate::admin_access::AdminAccess,
    ) -> std::io::Result<actix_web::dev::Server> {
        admin::start_guarded(listen, Arc::new(self.clone()), access)
    }

    /// Sets the callback that accepts or refuses each visitor.
    #[must_use]
    pub fn on_connection(mut self, callback: ConnectionCallback) -> Self {
        self.on_connection = Some(callback);
        self
    }

    /// The stable client id sent in every `Auth`.
    pub fn client_id(&self) -> Uuid {
        self.client_id
    }

    /// Traffic through this agent so far.
    pub fn stats(&self) -> Snapshot {
        self.counters.snapshot()
    }

    /// Runs until [`stop`](Self::stop) (then `Ok`) or until every server
    /// refuses the token (then `Err`). Every other fault is retried on
    /// backoff, each link on its own.
    pub async fn run(&self) -> Result<()> {
        self.config.validate()?;
        let mut ends = Vec::new();
        let started = self.start_links(&mut ends).await;
        let stop_asked = self.control.lock().is_ok_and(|c| c.stop_requested);
        if started.is_err() {
            self.stop(); // the links started already end too
        }
        let results = futures::future::join_all(ends).await;
        if let Ok(mut c) = self.control.lock() {
            c.addrs.clear(); // the last addresses: the actors end instead of restarting
            c.threads.drain(..).for_each(|t| runtime::stop_thread(&t));
            // a start that failed stopped its links, not the agent
            c.stop_requested = stop_asked || started.is_ok() && c.stop_requested;
        }
        started?;
        // Ok when any link ended Ok (a stop); the first error otherwise; a
        // link that stood down (its sender dropped) gives no verdict
        let mut results = results.into_iter().filter_map(|r| r.ok());
        let first = results.next().unwrap_or(Err(TunnelError::Shutdown));
        results.fold(first, |acc, r| acc.or_else(|error| r.map_err(|_| error)))
    }

    /// Stops the agent: its streams are closed and `run()` returns `Ok`.
    pub fn stop(&self) {
        if let Ok(mut c) = self.control.lock() {
            c.stop_requested = true;
            for (_, addr) in &c.addrs {
                addr.do_send(StopAgent);
            }
        }
    }

    /// The seed's name for [`stop`](Self::stop).
    pub fn disconnect(&self) {
        self.stop();
    }
}

impl std::fmt::Debug for TunnelAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelAgent")
            .field("server_url", &self.config.server_url)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}
