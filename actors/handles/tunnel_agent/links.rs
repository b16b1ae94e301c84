//! Starting an agent's links: one per server, and `connections` to each,
//! the extra ones on threads of their own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use actix::Supervisor;
use tokio::sync::{oneshot, watch};

use super::TunnelAgent;
use crate::actors::agent_connection::{AgentConnection, StopAgent};
use crate::actors::handles::agent_shared::{AgentShared, client_tls, first_grants};
use crate::actors::io::runtime;
use crate::replicas::link_client_id;
use crate::{Result, TunnelError};

impl TunnelAgent {
    /// Starts every link, pushing to `ends` what says each has ended.
    pub(super) async fn start_links(
        &self,
        ends: &mut Vec<oneshot::Receiver<Result<()>>>,
    ) -> Result<()> {
        let assigned = Arc::new(watch::Sender::new(HashMap::new()));
        let several_links = self.links.len() > 1;
        // every link's settings first: one that cannot be used starts none
        let configs = (self.links.iter())
            .map(|(url, _)| {
                let config = self.config.for_server(url);
                client_tls(&config).map(|tls| (config, tls))
            })
            .collect::<Result<Vec<_>>>()?;
        let links = self.links.iter().zip(configs);
        for (i, ((_, view), (config, tls))) in links.enumerate() {
            if i == 1 {
                first_grants(&self.config, &assigned).await;
            }
            let (done_tx, done_rx) = oneshot::channel();
            // the extra links to a server are replicas
            let connection = self.connection_number(i);
            let shared = Arc::new(AgentShared {
                config,
                services: self.services.clone(),
                client_id: link_client_id(self.client_id, connection),
                connection,
                on_connection: self.on_connection.clone(),
                counters: self.counters.clone(),
                view: view.clone(),
                on_published: self.on_published.clone(),
                assigned: assigned.clone(),
                several_links,
                tls,
                done: Mutex::new(Some(done_tx)),
                logs: Mutex::default(),
            });
            self.start_link(i, shared, connection > 0)?;
            ends.push(done_rx);
        }
        Ok(())
    }

    /// Which of the links to its server link `i` is (0 for the first).
    pub(super) fn connection_number(&self, i: usize) -> usize {
        let url = &self.links[i].0;
        (self.links[..i].iter()).filter(|(u, _)| u == url).count()
    }

    /// Starts one link's connection actor on the runtime thread, or an
    /// extra link to a server on a thread of its own.
    fn start_link(&self, i: usize, shared: Arc<AgentShared>, own_thread: bool) -> Result<()> {
        let control = self.control.clone();
        let thread = match own_thread {
            true => {
                let thread = runtime::thread("zlayer-tunnel-link").map_err(|e| {
                    TunnelError::connection_msg(format!(
                        "cannot start a thread for an extra connection ({e}); lower `connections`"
                    ))
                })?;
                if let Ok(mut c) = self.control.lock() {
                    c.threads.push(thread.clone());
                }
                thread
            }
            false => runtime::arbiter().clone(),
        };
        let spawned = thread.spawn_fn(move || {
            let addr = Supervisor::start(move |_| AgentConnection::new(shared));
            if let Ok(mut c) = control.lock() {
                if c.stop_requested {
                    addr.do_send(StopAgent);
                }
                c.addrs.push((i, addr));
            }
        });
        if spawned {
            Ok(())
        } else {
            Err(TunnelError::Shutdown)
        }
    }
}
