//! The Wharf client library (runs on a glommio executor): pipelined connections, a metadata
//! cache that routes each partition to its owner shard's direct port, admin calls, a batching
//! [`producer::Producer`] and a [`consumer::Consumer`].

pub mod consumer;
pub mod groups;
pub mod producer;
pub mod queues;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use futures_channel::oneshot;
use futures_lite::io::{AsyncWriteExt, BufWriter};
use glommio::channels::local_channel::{self, LocalSender};
use glommio::net::TcpStream;
use glommio::task::JoinHandle;

use crate::peer_auth::PeerCredentials;
use crate::protocol::*;

pub const CONNECT_TIMEOUT_MS_DEFAULT: u64 = 5_000;
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 30_000;
const WRITE_BUFFER_BYTES: usize = 64 * 1024;
const READ_BUFFER_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {address}: {detail}")]
    Connect { address: String, detail: String },
    #[error("connection to {address} closed: {detail}")]
    Closed { address: String, detail: String },
    #[error("{what} timed out after {timeout_ms} ms")]
    Timeout { what: String, timeout_ms: u64 },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{code}: {message}")]
    Server { code: ErrorCode, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl ClientError {
    /// Whether retrying (after a metadata refresh and a backoff) may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::Closed { .. }
            | ClientError::Timeout { .. } => true,
            ClientError::Server { code, .. } => code.is_retriable(),
            ClientError::Protocol(_) | ClientError::Invalid(_) => false,
        }
    }

    pub fn server(code: ErrorCode, message: impl Into<String>) -> ClientError {
        ClientError::Server {
            code,
            message: message.into(),
        }
    }

    /// A short name for reports (`errors by kind`).
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Connect { .. } => "connect",
            ClientError::Closed { .. } => "closed",
            ClientError::Timeout { .. } => "timeout",
            ClientError::Protocol(_) => "protocol",
            ClientError::Server { code, .. } => code.name(),
            ClientError::Invalid(_) => "invalid",
        }
    }
}

type Waiters = RefCell<HashMap<u32, oneshot::Sender<Result<Frame, ClientError>>>>;

struct OutFrame {
    head: FrameBuf,
    payload: Vec<Rc<FrameBuf>>,
}

/// One pipelined connection: many requests in flight, responses matched by correlation id.
pub struct Connection {
    pub address: String,
    outgoing: LocalSender<OutFrame>,
    waiters: Rc<Waiters>,
    queued: Rc<Cell<usize>>,
    next_correlation_id: Cell<u32>,
    failure: Rc<RefCell<Option<String>>>,
    _reader: JoinHandle<()>,
    _writer: JoinHandle<()>,
}

impl Connection {
    pub async fn connect(
        address: &str,
        frame_bytes_max: usize,
    ) -> Result<Rc<Connection>, ClientError> {
        let connect_error = |detail: String| ClientError::Connect {
            address: address.to_string(),
            detail,
        };
        let socket_address = std::net::ToSocketAddrs::to_socket_addrs(address)
            .map_err(|e| connect_error(e.to_string()))?
            .next()
            .ok_or_else(|| connect_error("no address".to_string()))?;
        let stream = TcpStream::connect_timeout(
            socket_address,
            Duration::from_millis(CONNECT_TIMEOUT_MS_DEFAULT),
        )
        .await
        .map_err(|e| connect_error(e.to_string()))?;
        stream
            .set_nodelay(true)
            .map_err(|e| connect_error(e.to_string()))?;
        let (reader, writer) = futures_lite::io::split(stream);
        let mut reader = futures_lite::io::BufReader::with_capacity(READ_BUFFER_BYTES, reader);
        let waiters: Rc<Waiters> = Rc::new(RefCell::new(HashMap::new()));
        let failure = Rc::new(RefCell::new(None::<String>));
        // Unbounded so that queueing is synchronous (request order = call order); what is
        // queued is bounded by the callers (producer buffer, in-flight limits).
        let (outgoing, queue) = local_channel::new_unbounded::<OutFrame>();
        // Frames queued for the writer; it flushes when none are left, batching pipelined ones.
        let queued = Rc::new(Cell::new(0usize));
        let writer_queued = Rc::clone(&queued);
        let reader_waiters = Rc::clone(&waiters);
        let reader_failure = Rc::clone(&failure);
        let reader_address = address.to_string();
        let reader_task = glommio::spawn_local(async move {
            let detail = loop {
                match read_frame(&mut reader, frame_bytes_max).await {
                    Ok(Some(frame)) => {
                        let waiter = reader_waiters
                            .borrow_mut()
                            .remove(&frame.header.correlation_id);
                        match waiter {
                            Some(waiter) => {
                                let _ = waiter.send(Ok(frame));
                            }
                            None if frame.header.correlation_id == 0
                                && frame.header.error() != ErrorCode::None =>
                            {
                                // The server could not trust a frame we sent and closes.
                                let message = decode_body::<ErrorBody>(frame.body())
                                    .map_or_else(|e| e.to_string(), |b| b.message);
                                break format!("{}: {message}", frame.header.error());
                            }
                            None => {}
                        }
                    }
                    Ok(None) => break "closed by the server".to_string(),
                    Err((_, error)) => break error.to_string(),
                }
            };
            *reader_failure.borrow_mut() = Some(detail.clone());
            for (_, waiter) in reader_waiters.borrow_mut().drain() {
                let _ = waiter.send(Err(ClientError::Closed {
                    address: reader_address.clone(),
                    detail: detail.clone(),
                }));
            }
        })
        .detach();
        let writer_failure = Rc::clone(&failure);
        let writer_task = glommio::spawn_local(async move {
            let mut writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, writer);
            while let Some(frame) = queue.recv().await {
                writer_queued.set(writer_queued.get().saturating_sub(1));
                let mut result = writer.write_all(&frame.head).await;
                for part in &frame.payload {
                    if result.is_ok() {
                        result = writer.write_all(part).await;
                    }
                }
                if result.is_ok() && writer_queued.get() == 0 {
                    result = writer.flush().await;
                }
                if let Err(error) = result {
                    *writer_failure.borrow_mut() = Some(error.to_string());
                    break;
                }
            }
            let _ = writer.close().await;
        })
        .detach();
        Ok(Rc::new(Connection {
            address: address.to_string(),
            outgoing,
            waiters,
            queued,
            next_correlation_id: Cell::new(1),
            failure,
            _reader: reader_task,
            _writer: writer_task,
        }))
    }

    pub fn is_closed(&self) -> bool {
        self.failure.borrow().is_some()
    }

    /// Connects and, with credentials, proves the cluster secret to a broker's internal
    /// listener (and checks the broker's own proof): `crate::peer_auth` has the handshake.
    pub async fn connect_peer(
        address: &str,
        frame_bytes_max: usize,
        peer: Option<&PeerCredentials>,
    ) -> Result<Rc<Connection>, ClientError> {
        let connection = Connection::connect(address, frame_bytes_max).await?;
        if let Some(peer) = peer {
            connection.authenticate(peer).await?;
        }
        Ok(connection)
    }

    async fn authenticate(&self, peer: &PeerCredentials) -> Result<(), ClientError> {
        let client_nonce = crate::peer_auth::nonce().map_err(ClientError::Invalid)?;
        let frame = self
            .call(
                ApiKey::PeerAuthBegin,
                &PeerAuthBeginRequest {
                    broker_id: peer.broker_id,
                    client_nonce: client_nonce.to_vec(),
                },
                Vec::new(),
                REQUEST_TIMEOUT_MS_DEFAULT,
            )
            .await?;
        let begin: PeerAuthBeginResponse = decode(&frame)?;
        if begin.error != 0 {
            return Err(ClientError::server(
                ErrorCode::from_u16(begin.error),
                begin.message,
            ));
        }
        if !peer.secret.verify_server(
            &client_nonce,
            &begin.server_nonce,
            begin.broker_id,
            &begin.server_proof,
        ) {
            return Err(ClientError::server(
                ErrorCode::AuthenticationFailed,
                format!(
                    "the broker at {} did not prove the cluster secret",
                    self.address
                ),
            ));
        }
        let proof = peer
            .secret
            .client_proof(&begin.server_nonce, &client_nonce, peer.broker_id);
        let frame = self
            .call(
                ApiKey::PeerAuthProve,
                &PeerAuthProveRequest { proof },
                Vec::new(),
                REQUEST_TIMEOUT_MS_DEFAULT,
            )
            .await?;
        let result: TopicResult = decode(&frame)?;
        if result.error != 0 {
            return Err(ClientError::server(
                ErrorCode::from_u16(result.error),
                result.message,
            ));
        }
        Ok(())
    }

    fn closed_error(&self) -> ClientError {
        ClientError::Closed {
            address: self.address.clone(),
            detail: self
                .failure
                .borrow()
                .clone()
                .unwrap_or_else(|| "closed".to_string()),
        }
    }

    fn correlation_id(&self) -> u32 {
        let id = self.next_correlation_id.get();
        // 0 is reserved for errors about untrustworthy frames.
        self.next_correlation_id.set(id.wrapping_add(1).max(1));
        id
    }

    /// Sends a request and returns its response frame (a frame-level error becomes `Server`).
    pub async fn call<T: Message>(
        &self,
        api: ApiKey,
        body: &T,
        payload: Vec<Rc<FrameBuf>>,
        timeout_ms: u64,
    ) -> Result<Frame, ClientError> {
        self.start_call(api, body, payload, timeout_ms)?.await
    }

    /// Queues a request for writing *now* (requests go out in the order of these calls, which
    /// is what keeps a partition's pipelined batches in order) and returns the future of its
    /// response.
    pub fn start_call<T: Message>(
        &self,
        api: ApiKey,
        body: &T,
        payload: Vec<Rc<FrameBuf>>,
        timeout_ms: u64,
    ) -> Result<impl std::future::Future<Output = Result<Frame, ClientError>> + 'static, ClientError>
    {
        let id = self.enqueue(api, body, payload, true)?;
        let waiters = Rc::clone(&self.waiters);
        let address = self.address.clone();
        let failure = Rc::clone(&self.failure);
        let response = id.1;
        let id = id.0;
        Ok(async move {
            let closed = |failure: &RefCell<Option<String>>| ClientError::Closed {
                address: address.clone(),
                detail: failure
                    .borrow()
                    .clone()
                    .unwrap_or_else(|| "closed".to_string()),
            };
            let Some(response) = response else {
                return Err(closed(&failure));
            };
            let result = glommio::timer::timeout(Duration::from_millis(timeout_ms), async {
                Ok(response.await)
            })
            .await;
            let frame = match result {
                Ok(Ok(frame)) => frame?,
                Ok(Err(_)) => return Err(closed(&failure)),
                Err(_) => {
                    waiters.borrow_mut().remove(&id);
                    return Err(ClientError::Timeout {
                        what: format!("{} request to {address}", api.name()),
                        timeout_ms,
                    });
                }
            };
            let code = frame.header.error();
            if code != ErrorCode::None {
                let message = frame
                    .decode_body::<ErrorBody>()
                    .map_or_else(|e| e.to_string(), |b| b.message);
                return Err(ClientError::Server { code, message });
            }
            Ok(frame)
        })
    }

    /// Sends a request that gets no response (produce with acks=none), queued at once.
    pub fn send_only<T: Message>(
        &self,
        api: ApiKey,
        body: &T,
        payload: Vec<Rc<FrameBuf>>,
    ) -> Result<(), ClientError> {
        self.enqueue(api, body, payload, false).map(|_| ())
    }

    /// Encodes and queues a frame; with `reply`, registers the waiter for its response.
    #[allow(clippy::type_complexity)]
    fn enqueue<T: Message>(
        &self,
        api: ApiKey,
        body: &T,
        payload: Vec<Rc<FrameBuf>>,
        reply: bool,
    ) -> Result<(u32, Option<oneshot::Receiver<Result<Frame, ClientError>>>), ClientError> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let id = self.correlation_id();
        let slices: Vec<&[u8]> = payload.iter().map(|p| p.as_slice()).collect();
        let head = encode_frame(FrameKind::request(api, id), body, &slices)
            .map_err(|e| ClientError::Invalid(e.to_string()))?;
        let response = reply.then(|| {
            let (done, response) = oneshot::channel();
            self.waiters.borrow_mut().insert(id, done);
            response
        });
        self.queued.set(self.queued.get() + 1);
        if self.outgoing.try_send(OutFrame { head, payload }).is_err() {
            self.waiters.borrow_mut().remove(&id);
            self.queued.set(self.queued.get().saturating_sub(1));
            return Err(self.closed_error());
        }
        Ok((id, response))
    }
}

pub fn decode<T: Message>(frame: &Frame) -> Result<T, ClientError> {
    frame
        .decode_body()
        .map_err(|e| ClientError::Protocol(e.to_string()))
}

#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub bootstrap: String,
    pub request_timeout_ms: u64,
    pub frame_bytes_max: usize,
    /// Connect to each partition's owner shard directly (else everything goes to bootstrap).
    pub shard_aware: bool,
    /// Brokers only: authenticate every connection as this peer (internal listeners).
    pub peer: Option<PeerCredentials>,
}

impl ClientConfig {
    pub fn new(bootstrap: impl Into<String>) -> ClientConfig {
        ClientConfig {
            bootstrap: bootstrap.into(),
            request_timeout_ms: REQUEST_TIMEOUT_MS_DEFAULT,
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            shard_aware: true,
            peer: None,
        }
    }
}

/// Connections and metadata shared by producers, consumers and admin calls of one executor.
pub struct Client {
    pub config: ClientConfig,
    connections: RefCell<HashMap<String, Rc<Connection>>>,
    metadata: RefCell<Option<Rc<MetadataResponse>>>,
    /// The broker that answered the last bootstrap call (any broker serves metadata).
    bootstrap_last: RefCell<Option<String>>,
}

/// How long a metadata refresh waits for one broker before trying the next: a stopped
/// broker must not hold a client's failover for a whole request timeout.
pub const METADATA_TIMEOUT_MS: u64 = 2_000;
/// Rounds over every known broker before a metadata refresh gives up on retriable refusals.
pub const METADATA_ROUNDS_MAX: u32 = 6;
/// Metadata refreshes before a topic is declared unknown (the first at once, then after
/// `UNKNOWN_TOPIC_PAUSE_MS`, doubling: about 0.7 s in all).
pub const UNKNOWN_TOPIC_REFRESHES: u32 = 4;
pub const UNKNOWN_TOPIC_PAUSE_MS: u64 = 100;
/// The first pause between metadata rounds; it doubles each round up to
/// `METADATA_BACKOFF_MAX_MS` (about 3 s over all rounds: longer than a broker's session
/// timeout plus its re-registration).
pub const METADATA_BACKOFF_MS: u64 = 100;
pub const METADATA_BACKOFF_MAX_MS: u64 = 1_000;

impl Client {
    pub async fn connect(config: ClientConfig) -> Result<Rc<Client>, ClientError> {
        let client = Rc::new(Client {
            config,
            connections: RefCell::new(HashMap::new()),
            metadata: RefCell::new(None),
            bootstrap_last: RefCell::new(None),
        });
        let bootstrap = client.bootstrap().await?;
        let frame = bootstrap
            .call(
                ApiKey::Versions,
                &VersionsRequest {
                    client_name: "wharf-client".to_string(),
                },
                Vec::new(),
                client.config.request_timeout_ms,
            )
            .await?;
        let versions: VersionsResponse = decode(&frame)?;
        for api in ApiKey::ALL {
            let ours = api.supported_versions();
            let Some(theirs) = versions.apis.iter().find(|a| a.api_key == api as u16) else {
                continue;
            };
            if ours.1 < theirs.min_version || ours.1 > theirs.max_version {
                return Err(ClientError::Protocol(format!(
                    "the broker speaks {} versions {}..={}, this client {}",
                    api.name(),
                    theirs.min_version,
                    theirs.max_version,
                    ours.1
                )));
            }
        }
        Ok(client)
    }

    /// A live connection to `address`, reusing an open one.
    pub async fn connection(&self, address: &str) -> Result<Rc<Connection>, ClientError> {
        if let Some(connection) = self.connections.borrow().get(address) {
            if !connection.is_closed() {
                return Ok(Rc::clone(connection));
            }
        }
        let connection = Connection::connect_peer(
            address,
            self.config.frame_bytes_max,
            self.config.peer.as_ref(),
        )
        .await?;
        self.connections
            .borrow_mut()
            .insert(address.to_string(), Rc::clone(&connection));
        Ok(connection)
    }

    /// The brokers to ask for cluster-wide answers, in order: the one that answered last, the
    /// configured bootstrap list (comma-separated), then every broker the metadata named. A
    /// client outlives the death of its bootstrap broker this way.
    fn bootstrap_candidates(&self) -> Vec<String> {
        let mut candidates: Vec<String> = Vec::new();
        let mut add = |address: String| {
            if !address.is_empty() && !candidates.contains(&address) {
                candidates.push(address);
            }
        };
        if let Some(last) = self.bootstrap_last.borrow().clone() {
            add(last);
        }
        for address in self.config.bootstrap.split(',') {
            add(address.trim().to_string());
        }
        if let Some(metadata) = self.metadata.borrow().as_ref() {
            for broker in &metadata.brokers {
                add(format!("{}:{}", broker.host, broker.port));
            }
        }
        candidates
    }

    /// The broker that answered last, else the first configured one.
    fn bootstrap_address(&self) -> String {
        self.bootstrap_last
            .borrow()
            .clone()
            .or_else(|| self.bootstrap_candidates().into_iter().next())
            .unwrap_or_default()
    }

    /// A connection to a live broker of the cluster (see `bootstrap_candidates`).
    pub async fn bootstrap(&self) -> Result<Rc<Connection>, ClientError> {
        let mut last_error = None;
        for address in self.bootstrap_candidates() {
            match self.connection(&address).await {
                Ok(connection) => {
                    *self.bootstrap_last.borrow_mut() = Some(address);
                    return Ok(connection);
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| ClientError::Invalid("no bootstrap address".into())))
    }

    /// Asks the brokers in turn (each for at most `METADATA_TIMEOUT_MS`) until one answers.
    /// When every broker refused with a retriable error (`broker_unavailable` from a broker
    /// between losing its controller session and registering again, a broker restarting), it
    /// tries them all again after a backoff, at most `METADATA_ROUNDS_MAX` rounds.
    pub async fn refresh_metadata(&self) -> Result<Rc<MetadataResponse>, ClientError> {
        let timeout_ms = self.config.request_timeout_ms.min(METADATA_TIMEOUT_MS);
        let mut last_error = None;
        for round in 0..METADATA_ROUNDS_MAX {
            if round > 0 {
                let backoff_ms = (METADATA_BACKOFF_MS << (round - 1)).min(METADATA_BACKOFF_MAX_MS);
                glommio::timer::sleep(std::time::Duration::from_millis(backoff_ms)).await;
            }
            for address in self.bootstrap_candidates() {
                let connection = match self.connection(&address).await {
                    Ok(connection) => connection,
                    Err(error) => {
                        last_error = Some(error);
                        continue;
                    }
                };
                let answered = connection
                    .call(
                        ApiKey::Metadata,
                        &MetadataRequest { topics: None },
                        Vec::new(),
                        timeout_ms,
                    )
                    .await
                    .and_then(|frame| decode::<MetadataResponse>(&frame));
                match answered {
                    Ok(metadata) => {
                        let metadata = Rc::new(metadata);
                        *self.metadata.borrow_mut() = Some(Rc::clone(&metadata));
                        *self.bootstrap_last.borrow_mut() = Some(address);
                        return Ok(metadata);
                    }
                    Err(error) => {
                        self.connections.borrow_mut().remove(&address);
                        last_error = Some(error);
                    }
                }
            }
            if !last_error.as_ref().is_some_and(ClientError::is_retriable) {
                break;
            }
        }
        Err(last_error.unwrap_or_else(|| ClientError::Invalid("no bootstrap address".into())))
    }

    pub async fn metadata(&self) -> Result<Rc<MetadataResponse>, ClientError> {
        let cached = self.metadata.borrow().clone();
        match cached {
            Some(metadata) => Ok(metadata),
            None => self.refresh_metadata().await,
        }
    }

    /// Partition count of `topic`. A topic not in the cached metadata is looked up again, up
    /// to `UNKNOWN_TOPIC_REFRESHES` times with a growing pause: a topic just created is
    /// answered once the broker that took it applied it, and the others learn it at their next
    /// controller heartbeat (as Kafka's producer waits for a new topic's metadata).
    pub async fn partition_count(&self, topic: &str) -> Result<u32, ClientError> {
        for refresh in 0..=UNKNOWN_TOPIC_REFRESHES {
            let metadata = if refresh == 0 {
                self.metadata().await?
            } else {
                if refresh > 1 {
                    let pause_ms = UNKNOWN_TOPIC_PAUSE_MS << (refresh - 2);
                    glommio::timer::sleep(std::time::Duration::from_millis(pause_ms)).await;
                }
                self.refresh_metadata().await?
            };
            if let Some(t) = metadata.topics.iter().find(|t| t.name == topic) {
                return Ok(t.partitions.len() as u32);
            }
        }
        Err(ClientError::server(
            ErrorCode::UnknownTopic,
            format!("topic {topic:?} does not exist"),
        ))
    }

    /// Replicas per partition of `topic` (from the first partition's replica set).
    pub async fn replication_factor(&self, topic: &str) -> Result<usize, ClientError> {
        self.partition_count(topic).await?;
        let metadata = self.metadata().await?;
        Ok(metadata
            .topics
            .iter()
            .find(|t| t.name == topic)
            .and_then(|t| t.partitions.first())
            .map_or(0, |p| p.replicas.len()))
    }

    /// The address serving `topic`/`partition`: its owner shard's direct port when known.
    pub async fn partition_address(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<String, ClientError> {
        if !self.config.shard_aware {
            return Ok(self.bootstrap_address());
        }
        let metadata = self.metadata().await?;
        let owner = metadata
            .topics
            .iter()
            .find(|t| t.name == topic)
            .and_then(|t| t.partitions.iter().find(|p| p.partition == partition))
            .and_then(|p| {
                let broker = metadata.brokers.iter().find(|b| b.broker_id == p.leader)?;
                Some(match broker.shards.iter().find(|s| s.shard == p.shard) {
                    Some(shard) => format!("{}:{}", shard.host, shard.port),
                    // Another broker of the cluster: its listener forwards to the owner shard.
                    None => format!("{}:{}", broker.host, broker.port),
                })
            });
        Ok(owner.unwrap_or_else(|| self.bootstrap_address()))
    }

    /// The leader and leader epoch of `topic`/`partition` in the cached metadata.
    pub fn cached_leader(&self, topic: &str, partition: u32) -> Option<(u32, u32)> {
        let metadata = self.metadata.borrow();
        metadata
            .as_ref()?
            .topics
            .iter()
            .find(|t| t.name == topic)?
            .partitions
            .iter()
            .find(|p| p.partition == partition)
            .map(|p| (p.leader, p.leader_epoch))
    }

    /// Takes the hint of a `not_leader` refusal: `leader` leads `topic`/`partition` in `epoch`.
    /// The cached metadata changes only when the hint is newer than what it holds and names a
    /// broker it knows, so an old or odd hint cannot send the client backwards. Returns
    /// whether it changed.
    pub fn learn_leader(&self, topic: &str, partition: u32, leader: u32, epoch: u32) -> bool {
        let mut cached = self.metadata.borrow_mut();
        let Some(metadata) = cached.as_ref() else {
            return false;
        };
        let known = metadata.brokers.iter().any(|b| b.broker_id == leader);
        let newer = metadata
            .topics
            .iter()
            .find(|t| t.name == topic)
            .and_then(|t| t.partitions.iter().find(|p| p.partition == partition))
            .is_some_and(|p| epoch > p.leader_epoch);
        if !known || !newer {
            return false;
        }
        let mut updated = MetadataResponse::clone(metadata);
        for t in updated.topics.iter_mut().filter(|t| t.name == topic) {
            for p in t.partitions.iter_mut().filter(|p| p.partition == partition) {
                p.leader = leader;
                p.leader_epoch = epoch;
            }
        }
        *cached = Some(Rc::new(updated));
        true
    }

    /// The address of `broker`'s shard that owns `topic`/`partition` (a follower fetches from
    /// the leader it was told to follow, whatever the metadata it asks says leads).
    pub async fn partition_address_on(
        &self,
        topic: &str,
        partition: u32,
        broker: u32,
    ) -> Result<Option<String>, ClientError> {
        let metadata = self.metadata().await?;
        let shard = metadata
            .topics
            .iter()
            .find(|t| t.name == topic)
            .and_then(|t| t.partitions.iter().find(|p| p.partition == partition))
            .map(|p| p.shard);
        let Some(shard) = shard else {
            return Ok(None);
        };
        Ok(metadata
            .brokers
            .iter()
            .find(|b| b.broker_id == broker)
            .and_then(|b| b.shards.iter().find(|s| s.shard == shard))
            .map(|s| format!("{}:{}", s.host, s.port)))
    }

    /// Where to reach `broker` for `topic`/`partition`: the shard that owns it when the
    /// metadata lists that broker's shards, else its listener (which forwards). `None` when
    /// the metadata does not know the broker.
    pub async fn partition_address_at(
        &self,
        topic: &str,
        partition: u32,
        broker: u32,
    ) -> Result<Option<String>, ClientError> {
        if let Some(address) = self.partition_address_on(topic, partition, broker).await? {
            return Ok(Some(address));
        }
        let metadata = self.metadata().await?;
        Ok(metadata
            .brokers
            .iter()
            .find(|b| b.broker_id == broker)
            .map(|b| format!("{}:{}", b.host, b.port)))
    }

    pub async fn partition_connection(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<Rc<Connection>, ClientError> {
        let address = self.partition_address(topic, partition).await?;
        self.connection(&address).await
    }

    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u16,
        configs: Vec<ConfigEntry>,
    ) -> Result<(), ClientError> {
        let request = CreateTopicRequest {
            name: name.to_string(),
            partitions,
            replication_factor,
            configs,
        };
        self.topic_change(ApiKey::CreateTopic, &request).await
    }

    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        let request = DeleteTopicRequest {
            name: name.to_string(),
        };
        self.topic_change(ApiKey::DeleteTopic, &request).await
    }

    /// Sends a create or delete to the bootstrap broker and refreshes the metadata after it.
    async fn topic_change<T: Message>(&self, api: ApiKey, request: &T) -> Result<(), ClientError> {
        let frame = self
            .bootstrap()
            .await?
            .call(api, request, Vec::new(), self.config.request_timeout_ms)
            .await?;
        topic_result(decode(&frame)?)?;
        self.refresh_metadata().await?;
        Ok(())
    }

    pub async fn list_topics(&self) -> Result<Vec<TopicMetadata>, ClientError> {
        Ok(self.refresh_metadata().await?.topics.clone())
    }

    /// Describes a topic; each partition as its leader sees it (ISR, high watermark), asking
    /// the other brokers of a cluster for the partitions they lead.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription, ClientError> {
        let bootstrap = self.bootstrap().await?;
        let mut topic = self.describe_at(&bootstrap, name).await?;
        let metadata = self.refresh_metadata().await?;
        let mut remote: HashMap<String, TopicDescription> = HashMap::new();
        for partition in &mut topic.partitions {
            let Some(leader) = metadata
                .brokers
                .iter()
                .find(|b| b.broker_id == partition.leader)
            else {
                continue;
            };
            if !leader.shards.is_empty() {
                continue; // The bootstrap broker leads it: already its own view.
            }
            let address = format!("{}:{}", leader.host, leader.port);
            if !remote.contains_key(&address) {
                let Ok(connection) = self.connection(&address).await else {
                    continue; // Leader down: keep this broker's view.
                };
                if let Ok(described) = self.describe_at(&connection, name).await {
                    remote.insert(address.clone(), described);
                }
            }
            if let Some(found) = remote.get(&address).and_then(|t| {
                t.partitions
                    .iter()
                    .find(|p| p.partition == partition.partition)
            }) {
                *partition = found.clone();
            }
        }
        Ok(topic)
    }

    /// Where the consumers of `topic` read (follower reads), as each partition's leader
    /// knows it, with the leader shard's load. Partitions whose leader does not answer are
    /// left out.
    pub async fn describe_readers(
        &self,
        topic: &str,
    ) -> Result<Vec<PartitionReaders>, ClientError> {
        let metadata = self.refresh_metadata().await?;
        let Some(described) = metadata.topics.iter().find(|t| t.name == topic) else {
            return Err(ClientError::server(
                ErrorCode::UnknownTopic,
                format!("topic {topic:?} does not exist"),
            ));
        };
        let code = ErrorCode::from_u16(described.error);
        if code != ErrorCode::None {
            return Err(ClientError::server(code, format!("topic {topic:?}")));
        }
        let mut leaders: Vec<u32> = described.partitions.iter().map(|p| p.leader).collect();
        leaders.sort_unstable();
        leaders.dedup();
        let mut partitions = Vec::new();
        for leader in leaders {
            let Some(broker) = metadata.brokers.iter().find(|b| b.broker_id == leader) else {
                continue;
            };
            let address = format!("{}:{}", broker.host, broker.port);
            let Ok(connection) = self.connection(&address).await else {
                continue;
            };
            let frame = connection
                .call(
                    ApiKey::DescribeReaders,
                    &DescribeReadersRequest {
                        topic: topic.to_string(),
                    },
                    Vec::new(),
                    self.config.request_timeout_ms,
                )
                .await?;
            let response: DescribeReadersResponse = decode(&frame)?;
            partitions.extend(response.partitions);
        }
        partitions.sort_by_key(|p| p.partition);
        partitions.dedup_by_key(|p| p.partition);
        Ok(partitions)
    }

    async fn describe_at(
        &self,
        connection: &Connection,
        name: &str,
    ) -> Result<TopicDescription, ClientError> {
        let frame = connection
            .call(
                ApiKey::DescribeTopic,
                &DescribeTopicRequest {
                    name: name.to_string(),
                },
                Vec::new(),
                self.config.request_timeout_ms,
            )
            .await?;
        let response: DescribeTopicResponse = decode(&frame)?;
        let code = ErrorCode::from_u16(response.error);
        match response.topic {
            Some(topic) if code == ErrorCode::None => Ok(topic),
            _ => Err(ClientError::server(code, response.message)),
        }
    }

    /// A producer id for an idempotent producer (`None`), or the next epoch of the one it
    /// holds: (id, epoch).
    pub async fn init_producer_id(
        &self,
        holding: Option<(u64, u16)>,
    ) -> Result<(u64, u16), ClientError> {
        let bootstrap = self.bootstrap().await?;
        let frame = bootstrap
            .call(
                ApiKey::InitProducerId,
                &InitProducerIdRequest {
                    producer_id: holding.map(|(id, _)| id),
                    producer_epoch: holding.map_or(0, |(_, epoch)| epoch),
                },
                Vec::new(),
                self.config.request_timeout_ms,
            )
            .await?;
        let response: InitProducerIdResponse = decode(&frame)?;
        match ErrorCode::from_u16(response.error) {
            ErrorCode::None => Ok((response.producer_id, response.producer_epoch)),
            code => Err(ClientError::server(code, response.message)),
        }
    }

    /// The cluster as the bootstrap broker sees it: brokers (alive, fenced, shutting down) and
    /// the controller (controller mode only).
    pub async fn cluster_status(&self) -> Result<ClusterStatusResponse, ClientError> {
        let bootstrap = self.bootstrap().await?;
        let frame = bootstrap
            .call(
                ApiKey::ClusterStatus,
                &ClusterStatusRequest {},
                Vec::new(),
                self.config.request_timeout_ms,
            )
            .await?;
        let response: ClusterStatusResponse = decode(&frame)?;
        let code = ErrorCode::from_u16(response.error);
        if code == ErrorCode::None {
            Ok(response)
        } else {
            Err(ClientError::server(code, response.message))
        }
    }

    /// Offsets of `partitions` of `topic` per `spec`.
    pub async fn list_offsets(
        &self,
        topic: &str,
        partitions: &[u32],
        spec: OffsetSpec,
    ) -> Result<Vec<(u32, u64)>, ClientError> {
        let mut offsets = Vec::new();
        for &partition in partitions {
            let connection = self.partition_connection(topic, partition).await?;
            let frame = connection
                .call(
                    ApiKey::ListOffsets,
                    &ListOffsetsRequest {
                        topic: topic.to_string(),
                        partitions: vec![ListOffsetsPartition { partition, spec }],
                    },
                    Vec::new(),
                    self.config.request_timeout_ms,
                )
                .await?;
            let response: ListOffsetsResponse = decode(&frame)?;
            for p in response.partitions {
                let code = ErrorCode::from_u16(p.error);
                if code != ErrorCode::None {
                    return Err(ClientError::server(code, p.message));
                }
                offsets.push((p.partition, p.offset));
            }
        }
        Ok(offsets)
    }
}

fn topic_result(result: TopicResult) -> Result<(), ClientError> {
    match ErrorCode::from_u16(result.error) {
        ErrorCode::None => Ok(()),
        code => Err(ClientError::server(code, result.message)),
    }
}
