//! `FlowHub`: the agent's UDP flows of one link, and the datagrams waiting
//! for its WebSocket. Not an actor: it joins the agent connection to its
//! `UdpFlow` actors, as `StreamHub` does for TCP streams. The waiting
//! datagrams are bounded in bytes; past that they are dropped and counted.

use std::collections::{HashMap, VecDeque};

use actix::{Addr, Recipient};
use bytes::Bytes;
use uuid::Uuid;

use crate::accounting::CounterSet;
use crate::actors::udp_flow::{CloseFlow, ToService, UdpFlow};
use crate::actors::udp_forward::ToVisitor;

/// Where a flow's datagrams from the link go.
pub(crate) enum FlowEnd {
    /// A socket toward the local service (a visitor's flow), and the
    /// counters of its service (and of the agent), for what is dropped here.
    Service(Addr<UdpFlow>, CounterSet),
    /// A forwarded visitor (a cluster's UDP forward, over a peer link).
    Visitor(Recipient<ToVisitor>),
}

/// A link's flows and waiting datagrams.
pub(crate) struct FlowHub {
    flows: HashMap<Uuid, FlowEnd>,
    waiting: VecDeque<Bytes>,
    waiting_bytes: usize,
    /// Bytes of datagrams that may wait for the WebSocket (the agent's `udp_waiting`).
    limit: usize,
}

impl FlowHub {
    /// No flows, nothing waiting; at most `limit` bytes may wait.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            flows: HashMap::new(),
            waiting: VecDeque::new(),
            waiting_bytes: 0,
            limit,
        }
    }

    /// Adds a started flow.
    pub(crate) fn insert(&mut self, id: Uuid, flow: FlowEnd) {
        self.flows.insert(id, flow);
    }

    /// The counters of flow `id`'s service, if it is a service's flow.
    pub(crate) fn counters(&self, id: Uuid) -> Option<&CounterSet> {
        match self.flows.get(&id) {
            Some(FlowEnd::Service(_, counters)) => Some(counters),
            _ => None,
        }
    }

    /// True while flow `id` is open.
    pub(crate) fn contains(&self, id: Uuid) -> bool {
        self.flows.contains_key(&id)
    }

    /// A datagram from the server for flow `id`; false if the flow is unknown.
    pub(crate) fn deliver(&self, id: Uuid, data: Bytes) -> bool {
        match self.flows.get(&id) {
            Some(FlowEnd::Service(flow, _)) => flow.do_send(ToService(data)),
            Some(FlowEnd::Visitor(to)) => to.do_send(ToVisitor::Datagram { id, data }),
            None => return false,
        }
        true
    }

    /// The server closed flow `id` (the table forgot it): its socket closes.
    pub(crate) fn close(&mut self, id: Uuid) {
        match self.flows.remove(&id) {
            Some(FlowEnd::Service(flow, _)) => flow.do_send(CloseFlow),
            Some(FlowEnd::Visitor(to)) => to.do_send(ToVisitor::Closed { id }),
            None => {}
        }
    }

    /// The link ended: every forwarded visitor's flow is closed (the
    /// service flows stop with the link's cancel token).
    pub(crate) fn close_all(&mut self) {
        let ids: Vec<Uuid> = self.flows.keys().copied().collect();
        ids.into_iter().for_each(|id| self.close(id));
    }

    /// Flow `id` stopped on its own.
    pub(crate) fn ended(&mut self, id: Uuid) {
        self.flows.remove(&id);
    }

    /// Queues a reply frame for the WebSocket; false (dropped) over the bound.
    pub(crate) fn queue(&mut self, frame: Bytes) -> bool {
        if self.waiting_bytes + frame.len() > self.limit {
            return false;
        }
        self.waiting_bytes += frame.len();
        self.waiting.push_back(frame);
        true
    }

    /// True when no datagram waits.
    pub(crate) fn nothing_waiting(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Moves every waiting datagram into `batch`.
    pub(crate) fn drain_into(&mut self, batch: &mut Vec<Bytes>) {
        batch.extend(self.waiting.drain(..));
        self.waiting_bytes = 0;
    }
}
