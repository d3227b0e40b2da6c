//! [`Store`] over a real etcd v3 cluster (the `etcd-client` crate).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use serde::Deserialize;

use super::{
    Compare, EventKind, Guarded, Head, KeyValue, Lease, LeaseId, Listing, MAX_BATCH, Op, RawEvent,
    Revision, Store, StoreError, WatchMessage, WatchSession,
};

/// How to reach etcd. Embedded in every part's configuration file as `[etcd]` or
/// `[discovery.etcd]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `["http://127.0.0.1:2379"]`.
    #[serde(default = "default_endpoints")]
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub username: Option<String>,
    /// Never logged: `Debug` redacts it.
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// Time allowed to open a connection.
    #[serde(default = "default_dial_timeout", with = "crate::model::duration_str")]
    pub dial_timeout: Duration,
    /// Time allowed for one unary request.
    #[serde(
        default = "default_request_timeout",
        with = "crate::model::duration_str"
    )]
    pub request_timeout: Duration,
}

/// PEM files for TLS to etcd.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA bundle that signed the etcd server certificates.
    pub ca: PathBuf,
    /// Client certificate and key, for clusters that require client auth.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Name to verify the server certificate against, when it differs from the URL host.
    #[serde(default)]
    pub domain: Option<String>,
}

fn default_endpoints() -> Vec<String> {
    vec!["http://127.0.0.1:2379".to_owned()]
}
fn default_dial_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(5)
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: default_endpoints(),
            username: None,
            password: None,
            tls: None,
            dial_timeout: default_dial_timeout(),
            request_timeout: default_request_timeout(),
        }
    }
}

impl EtcdConfig {
    /// A configuration for the given endpoints with default timeouts and no auth.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("dial_timeout", &self.dial_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// A connection to an etcd cluster. Cheap to clone; clones share the channel.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    timeout: Duration,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore").finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Builds the client. Without auth this does not wait for etcd to be reachable: the
    /// channel connects on first use, so a part can start before etcd does. With a username
    /// it authenticates now and fails if etcd is down.
    pub async fn connect(config: &EtcdConfig) -> Result<Self, StoreError> {
        if config.endpoints.is_empty() {
            return Err(StoreError::Config("no etcd endpoints".into()));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.dial_timeout)
            .with_timeout(config.request_timeout)
            // HTTP/2 pings find a dead peer on an otherwise idle watch stream.
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        match (&config.username, &config.password) {
            (Some(user), Some(password)) => options = options.with_user(user, password),
            (None, None) => {}
            _ => {
                return Err(StoreError::Config(
                    "etcd username and password must be given together".into(),
                ));
            }
        }
        if let Some(tls) = &config.tls {
            options = options.with_tls(tls_options(tls)?);
        }
        let client = Client::connect(&config.endpoints, Some(options)).await?;
        Ok(Self {
            client,
            timeout: config.request_timeout,
        })
    }

    /// The underlying client, for operations outside the [`Store`] trait.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Compacts the key space up to `revision` (an operator action; used by tests and benches).
    pub async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut kv = self.client.kv_client();
        self.bounded(async move { kv.compact(revision, None).await })
            .await?;
        Ok(())
    }

    /// Current store revision (linearizable).
    pub async fn revision(&self) -> Result<Revision, StoreError> {
        Ok(self.head().await?.revision)
    }

    /// Runs one request with the configured deadline. tonic's own timeout only covers the
    /// time to response headers; this covers the whole call.
    async fn bounded<T>(
        &self,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r.map_err(StoreError::from),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }
}

fn tls_options(tls: &TlsFiles) -> Result<etcd_client::TlsOptions, StoreError> {
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| StoreError::Config(format!("reading {}: {e}", p.display())))
    };
    let mut options = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?));
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            options = options.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        (None, None) => {}
        _ => {
            return Err(StoreError::Config(
                "etcd tls cert and key must be given together".into(),
            ));
        }
    }
    if let Some(domain) = &tls.domain {
        options = options.domain_name(domain);
    }
    Ok(options)
}

/// Largest watch response accepted.
const WATCH_MESSAGE_LIMIT: usize = 64 << 20;

/// Largest list page accepted (5,000 keys of unusually large values).
const LIST_MESSAGE_LIMIT: usize = 32 << 20;

/// Keys per page of a list.
const LIST_PAGE: i64 = 5000;

/// The exclusive end of the key range of `prefix`, as etcd's `WithPrefix` computes it.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte is 0xff: the range runs to the end of the key space.
    vec![0]
}

fn convert_kv(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

impl Store for EtcdStore {
    type Watch = EtcdWatch;

    async fn list(&self, prefixes: &[String]) -> Result<Listing, StoreError> {
        let mut listing = Listing {
            revision: 0,
            cluster_id: 0,
            kvs: Vec::new(),
        };
        for prefix in prefixes {
            let end = prefix_end(prefix.as_bytes());
            let mut from = prefix.as_bytes().to_vec();
            // Pages keep every response far below gRPC's message size limit (a catalog of
            // 100,000 instances is tens of MB). The first read is linearizable and fixes the
            // revision; every later page, and every other prefix, is pinned to it so that the
            // whole listing is one consistent snapshot.
            loop {
                let mut options = GetOptions::new()
                    .with_range(end.clone())
                    .with_limit(LIST_PAGE);
                if listing.revision > 0 {
                    options = options.with_revision(listing.revision);
                }
                let mut kv = self
                    .client
                    .kv_client()
                    .max_decoding_message_size(LIST_MESSAGE_LIMIT);
                let key = from.clone();
                let mut resp = self
                    .bounded(async move { kv.get(key, Some(options)).await })
                    .await?;
                if let Some(h) = resp.header()
                    && listing.revision == 0
                {
                    listing.revision = h.revision();
                    listing.cluster_id = h.cluster_id();
                }
                let more = resp.more();
                let kvs = resp.take_kvs();
                if let Some(last) = kvs.last() {
                    // The next page starts just after the last key: key + "\0".
                    from = last.key().to_vec();
                    from.push(0);
                }
                listing.kvs.extend(kvs.iter().map(convert_kv));
                if !more || kvs.is_empty() {
                    break;
                }
            }
        }
        Ok(listing)
    }

    async fn head(&self) -> Result<Head, StoreError> {
        let mut kv = self.client.kv_client();
        let resp = self
            .bounded(async move {
                kv.get(vec![0u8], Some(GetOptions::new().with_count_only()))
                    .await
            })
            .await?;
        let h = resp
            .header()
            .ok_or_else(|| StoreError::Other("etcd answered without a header".into()))?;
        Ok(Head {
            revision: h.revision(),
            cluster_id: h.cluster_id(),
        })
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut kv = self.client.kv_client();
        let key = key.to_owned();
        let resp = self.bounded(async move { kv.get(key, None).await }).await?;
        Ok(resp.kvs().first().map(convert_kv))
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        let mut kv = self.client.kv_client();
        let key = key.to_owned();
        let options = lease.map(|l| PutOptions::new().with_lease(l));
        let resp = self
            .bounded(async move { kv.put(key, value, options).await })
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let mut kv = self.client.kv_client();
        let key = key.to_owned();
        let resp = self
            .bounded(async move { kv.delete(key, None).await })
            .await?;
        Ok(resp.deleted() > 0)
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool, StoreError> {
        let mut kv = self.client.kv_client();
        let txn = etcd_txn(compares, ops);
        let resp = self.bounded(async move { kv.txn(txn).await }).await?;
        Ok(resp.succeeded())
    }

    async fn txn_batch(&self, txns: Vec<Guarded>) -> Result<Vec<bool>, StoreError> {
        if txns.is_empty() {
            return Ok(Vec::new());
        }
        if txns.len() > MAX_BATCH {
            return Err(StoreError::Other(format!(
                "{} transactions in one batch (at most {MAX_BATCH})",
                txns.len()
            )));
        }
        let count = txns.len();
        let nested: Vec<TxnOp> = txns
            .into_iter()
            .map(|t| TxnOp::txn(etcd_txn(t.compares, t.ops)))
            .collect();
        let mut kv = self.client.kv_client();
        let resp = self
            .bounded(async move { kv.txn(Txn::new().and_then(nested)).await })
            .await?;
        let applied: Vec<bool> = resp
            .op_responses()
            .into_iter()
            .map(|r| matches!(r, TxnOpResponse::Txn(t) if t.succeeded()))
            .collect();
        if applied.len() != count {
            return Err(StoreError::Other(format!(
                "etcd answered {} results to a batch of {count} transactions",
                applied.len()
            )));
        }
        Ok(applied)
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<Lease, StoreError> {
        let mut lease = self.client.lease_client();
        let secs = ttl.as_secs().max(1) as i64;
        let resp = self
            .bounded(async move { lease.grant(secs, None).await })
            .await?;
        Ok(Lease {
            id: resp.id(),
            ttl: Duration::from_secs(resp.ttl().max(1) as u64),
        })
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<Option<Duration>, StoreError> {
        let mut lease = self.client.lease_client();
        let result = self
            .bounded(async move {
                let (mut keeper, mut stream) = lease.keep_alive(id).await?;
                // The first answer (read inside `keep_alive`) proved the lease exists; a
                // second round trip tells the TTL etcd reset it to.
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await;
        match result {
            Ok(Some(resp)) if resp.ttl() > 0 => Ok(Some(Duration::from_secs(resp.ttl() as u64))),
            Ok(Some(_)) => Ok(None),
            Ok(None) => Err(StoreError::StreamClosed),
            Err(StoreError::Etcd(etcd_client::Error::LeaseKeepAliveError(msg)))
                if msg.contains("not found") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        let mut lease = self.client.lease_client();
        match self.bounded(async move { lease.revoke(id).await }).await {
            Ok(_) => Ok(()),
            // Revoking a lease that already expired is success: its keys are gone either way.
            Err(StoreError::Etcd(etcd_client::Error::GRpcStatus(s)))
                if s.message().contains("not found") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn watch(&self, watches: &[(String, Revision)]) -> Result<EtcdWatch, StoreError> {
        let options = |i: usize| {
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(watches[i].1)
                .with_progress_notify()
                // Ids are chosen by us (index + 1; 0 means "server picks") so that events
                // can be matched to their prefix whatever order the creations complete in.
                .with_watch_id(i as i64 + 1)
        };
        let (first, _) = watches
            .first()
            .ok_or_else(|| StoreError::Config("watch needs at least one prefix".into()))?;
        // One revision is never split across watch responses, so a large transaction arrives
        // as one message: allow more than gRPC's default 4 MiB.
        let mut client = self
            .client
            .watch_client()
            .max_decoding_message_size(WATCH_MESSAGE_LIMIT);
        let first = first.clone();
        let opts = options(0);
        let mut stream = self
            .bounded(async move { client.watch(first, Some(opts)).await })
            .await?;
        for (i, (prefix, _)) in watches.iter().enumerate().skip(1) {
            stream.watch(prefix.clone(), Some(options(i))).await?;
        }
        Ok(EtcdWatch { stream })
    }
}

/// One etcd watch stream carrying a watch per prefix.
pub struct EtcdWatch {
    stream: WatchStream,
}

impl WatchSession for EtcdWatch {
    async fn next(&mut self) -> Result<Option<WatchMessage>, StoreError> {
        let Some(resp) = self.stream.message().await? else {
            return Ok(None);
        };
        let (cluster_id, revision) = resp
            .header()
            .map(|h| (h.cluster_id(), h.revision()))
            .unwrap_or((0, 0));
        // Our ids are index + 1; -1 marks an answer to a progress request.
        let watch_id = resp.watch_id() - 1;
        let message = if resp.canceled() {
            WatchMessage::Canceled {
                watch_id,
                compact_revision: resp.compact_revision(),
                reason: resp.cancel_reason().to_owned(),
            }
        } else if resp.created() {
            WatchMessage::Created {
                watch_id,
                cluster_id,
                revision,
            }
        } else if resp.events().is_empty() {
            WatchMessage::Progress {
                watch_id: (resp.watch_id() >= 1).then_some(watch_id),
                cluster_id,
                revision,
            }
        } else {
            let events = resp
                .events()
                .iter()
                .filter_map(|e| {
                    let kind = match e.event_type() {
                        EventType::Put => EventKind::Put,
                        EventType::Delete => EventKind::Delete,
                    };
                    e.kv().map(|kv| RawEvent {
                        kind,
                        kv: convert_kv(kv),
                    })
                })
                .collect();
            WatchMessage::Events {
                watch_id,
                cluster_id,
                events,
            }
        };
        Ok(Some(message))
    }

    async fn request_progress(&mut self) -> Result<(), StoreError> {
        self.stream.request_progress().await?;
        Ok(())
    }
}

/// One etcd transaction: `ops` if every compare holds.
fn etcd_txn(compares: Vec<Compare>, ops: Vec<Op>) -> Txn {
    let compares: Vec<EtcdCompare> = compares
        .into_iter()
        .map(|c| match c {
            Compare::ModRevision(k, r) => EtcdCompare::mod_revision(k, CompareOp::Equal, r),
            Compare::CreateRevision(k, r) => EtcdCompare::create_revision(k, CompareOp::Equal, r),
        })
        .collect();
    let ops: Vec<TxnOp> = ops
        .into_iter()
        .map(|op| match op {
            Op::Put { key, value, lease } => {
                TxnOp::put(key, value, lease.map(|l| PutOptions::new().with_lease(l)))
            }
            Op::Delete { key } => TxnOp::delete(key, None),
        })
        .collect();
    Txn::new().when(compares).and_then(ops)
}
