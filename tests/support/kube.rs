//! A fake Kubernetes API server for Node discovery tests.
//!
//! It speaks the real list/watch wire protocol over HTTP/1.1 on 127.0.0.1, so the real kube-rs
//! client (built from the kubeconfig this writes) talks to it over a socket: no mocks inside
//! the client. Include it from a test with
//!
//! ```ignore
//! #[path = "support/kube.rs"]
//! mod kube_fake;
//! use kube_fake::{node, FakeKube};
//! ```
//!
//! What it serves:
//! - `GET /api/v1/nodes` (list, `NodeList`, items without `kind`/`apiVersion` as the real
//!   server sends them; `labelSelector` honoured; `limit`/`continue` honoured by name order).
//! - `GET /api/v1/nodes?watch=true&resourceVersion=R&allowWatchBookmarks=true&timeoutSeconds=T`
//!   (chunked stream of one JSON `{"type":..,"object":..}` per line: history after R, then live
//!   events; selector transitions become ADDED/DELETED like the real watch cache; a too-old R
//!   gets one `ERROR` event with a 410 `Expired` Status and the stream ends; the stream ends
//!   cleanly after `timeoutSeconds`).
//! - `GET /api/v1/nodes/{name}`, `GET /version`, `/healthz`, `/livez`, `/readyz`.
//! - Anything else: 404 with a JSON `Status` (and recorded in `unknown_requests()`).
//!
//! Test controls are on [`FakeKube`]; nothing in here sleeps to synchronise.
//!
//! kube-rs notes (kube 5): `watcher` sends the watch request only when its stream is polled
//! after `InitDone`, so drive the stream from its own task before awaiting
//! `wait_for_watchers`. The client needs a rustls CryptoProvider even for `http://` (it builds
//! the TLS connector unconditionally); rustls's `ring` feature in Cargo.toml provides it.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE, TRANSFER_ENCODING};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

type BoxError = Box<dyn StdError + Send + Sync>;
type RespBody = BoxBody<Bytes, BoxError>;

/// The bearer token written into the kubeconfig.
pub const FAKE_TOKEN: &str = "fake-kube-token";

// ---------------------------------------------------------------------------------------------
// Public handle
// ---------------------------------------------------------------------------------------------

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query exactly as sent (still percent-encoded).
    pub target: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

/// The kind of a stored watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// Handle on a running fake API server. Dropping it stops the server and ends every
/// connection.
pub struct FakeKube {
    inner: Arc<Inner>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl FakeKube {
    /// Binds 127.0.0.1:0 and starts serving. Needs a tokio runtime.
    pub async fn start() -> FakeKube {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake kube-apiserver");
        let addr = listener.local_addr().expect("fake kube-apiserver addr");
        let (watchers_tx, _) = watch::channel(0usize);
        let (lists_tx, _) = watch::channel(0usize);
        let (watch_reqs_tx, _) = watch::channel(0usize);
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            net: Mutex::new(Net::default()),
            log: Mutex::new(Vec::new()),
            open_watches: watchers_tx,
            list_requests: lists_tx,
            watch_requests: watch_reqs_tx,
        });
        inner.net().accept = Some(spawn_accept(inner.clone(), listener));
        FakeKube {
            inner,
            addr,
            dir: tempfile::tempdir().expect("temp dir for kubeconfig"),
        }
    }

    /// The listening address (stays the same across `set_down`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes (or rewrites) a kubeconfig pointing at this server and returns its path. It has
    /// one cluster `fake` (`server: http://127.0.0.1:PORT`), one user `fake` with bearer token
    /// [`FAKE_TOKEN`], one context `fake` (namespace `default`), and `current-context: fake`.
    /// The file lives in a temp dir owned by this handle.
    pub fn kubeconfig(&self) -> PathBuf {
        let path = self.dir.path().join("kubeconfig");
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             preferences: {{}}\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {url}\n\
             users:\n\
             - name: fake\n  user:\n    token: {FAKE_TOKEN}\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n",
            url = self.url()
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Creates or replaces a Node (by `metadata.name`). Emits ADDED if it is new, else
    /// MODIFIED (always, even if nothing changed). Bumps the resourceVersion and stores it
    /// in `metadata.resourceVersion`; fills `uid` and `creationTimestamp` if missing (kept
    /// from the stored object on update). Returns the new resourceVersion.
    pub fn apply(&self, mut node: Value) -> u64 {
        let name = node["metadata"]["name"]
            .as_str()
            .expect("node needs metadata.name")
            .to_string();
        let mut st = self.inner.state();
        st.rv += 1;
        let rv = st.rv;
        let old = st.nodes.get(&name).cloned();
        {
            let obj = node.as_object_mut().expect("node must be a JSON object");
            obj.entry("apiVersion").or_insert_with(|| json!("v1"));
            obj.entry("kind").or_insert_with(|| json!("Node"));
            let meta = obj
                .entry("metadata")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("metadata must be an object");
            let keep = |field: &str, default: Value| {
                old.as_ref()
                    .and_then(|o| o["metadata"].get(field).cloned())
                    .unwrap_or(default)
            };
            if !meta.contains_key("uid") {
                meta.insert(
                    "uid".into(),
                    keep("uid", json!(format!("00000000-0000-4000-8000-{rv:012}"))),
                );
            }
            if !meta.contains_key("creationTimestamp") {
                meta.insert(
                    "creationTimestamp".into(),
                    keep("creationTimestamp", json!("2025-01-01T00:00:00Z")),
                );
            }
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
        }
        st.nodes.insert(name, node.clone());
        let ev = match old {
            None => StoredEvent {
                kind: EventType::Added,
                rv,
                object: node,
                old: None,
            },
            Some(old) => StoredEvent {
                kind: EventType::Modified,
                rv,
                object: node,
                old: Some(old),
            },
        };
        st.record(ev);
        rv
    }

    /// Applies `f` to a copy of the stored node and `apply`s the result (MODIFIED). Panics if
    /// the node does not exist.
    pub fn modify(&self, name: &str, f: impl FnOnce(&mut Value)) -> u64 {
        let mut node = self.get(name).unwrap_or_else(|| panic!("no node {name}"));
        f(&mut node);
        self.apply(node)
    }

    /// Deletes a Node: emits DELETED (the last state, with the deletion's resourceVersion).
    /// Returns the new resourceVersion, or `None` if there was no such node.
    pub fn delete(&self, name: &str) -> Option<u64> {
        let mut st = self.inner.state();
        let mut old = st.nodes.remove(name)?;
        st.rv += 1;
        let rv = st.rv;
        let mut object = old.clone();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        // `old` is what selectors are evaluated against; keep its labels.
        old["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.record(StoredEvent {
            kind: EventType::Deleted,
            rv,
            object,
            old: Some(old),
        });
        Some(rv)
    }

    /// The stored node, as the server would return it.
    pub fn get(&self, name: &str) -> Option<Value> {
        self.inner.state().nodes.get(name).cloned()
    }

    /// Names of all stored nodes, sorted.
    pub fn node_names(&self) -> Vec<String> {
        self.inner.state().nodes.keys().cloned().collect()
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.state().rv
    }

    /// Sends a BOOKMARK (current resourceVersion) to every open watch that asked for
    /// bookmarks (`allowWatchBookmarks=true`). Returns how many watches got one.
    pub fn bookmark(&self) -> usize {
        let mut st = self.inner.state();
        let line = event_line("BOOKMARK", &bookmark_object(st.rv));
        let mut sent = 0;
        st.watchers.retain(|_, w| {
            if !w.bookmarks {
                return true;
            }
            let ok = w.tx.send(Msg::Line(line.clone())).is_ok();
            sent += usize::from(ok);
            ok
        });
        let n = st.watchers.len();
        drop(st);
        self.inner.open_watches.send_replace(n);
        sent
    }

    /// Ends every open watch stream abruptly (the HTTP/1.1 connection is torn down in the
    /// middle of the chunked body, with no terminating chunk), so clients must reconnect.
    /// The open-watch count drops to 0 immediately. Returns how many were dropped.
    pub fn drop_watches(&self) -> usize {
        self.end_watches(EndHow::Abort)
    }

    /// Ends every open watch stream, either cleanly (terminating chunk, as a server-side
    /// timeout does) or abruptly. The open-watch count drops to 0 immediately. Returns how
    /// many were ended.
    pub fn end_watches(&self, how: EndHow) -> usize {
        let msg = match how {
            EndHow::Abort => Msg::Abort,
            EndHow::Clean => Msg::End,
        };
        let mut st = self.inner.state();
        let n = st.watchers.len();
        for (_, w) in st.watchers.drain() {
            let _ = w.tx.send(msg.clone());
        }
        drop(st);
        self.inner.open_watches.send_replace(0);
        n
    }

    /// Forgets the event history (like an etcd compaction): the resourceVersion is bumped
    /// (without an event) and a watch from any resourceVersion older than the new one gets a
    /// `410 Expired` ERROR event. Lists made after this return the new resourceVersion, from
    /// which watching works. Open watches are not affected.
    pub fn expire_history(&self) -> u64 {
        let mut st = self.inner.state();
        st.rv += 1;
        st.history.clear();
        st.floor = st.rv;
        st.rv
    }

    /// `true`: close the listening socket and every open connection (clients get "connection
    /// refused"); `false`: bind the SAME port again and serve. Resolves when done.
    pub async fn set_down(&self, down: bool) {
        if down {
            let (accept, conns) = {
                let mut net = self.inner.net();
                net.down = true;
                (net.accept.take(), std::mem::take(&mut net.conns))
            };
            if let Some(accept) = accept {
                accept.abort();
                let _ = accept.await;
            }
            for conn in conns {
                conn.abort();
                let _ = conn.await;
            }
            // Aborted bodies deregistered themselves; make sure nothing lingers.
            let mut st = self.inner.state();
            st.watchers.clear();
            drop(st);
            self.inner.open_watches.send_replace(0);
        } else {
            if !self.inner.net().down {
                return;
            }
            let listener = rebind(self.addr).await;
            let mut net = self.inner.net();
            net.down = false;
            net.accept = Some(spawn_accept(self.inner.clone(), listener));
        }
    }

    /// Whether `set_down(true)` is in effect.
    pub fn is_down(&self) -> bool {
        self.inner.net().down
    }

    /// `Some(code)`: answer every request with that HTTP status and a matching JSON `Status`
    /// (e.g. 403 Forbidden, 500, 503, 429); `None`: serve normally.
    pub fn fail_requests(&self, code: Option<u16>) {
        self.inner.state().fail = code;
    }

    /// How many list requests (`GET /api/v1/nodes` without watch) arrived.
    pub fn list_requests(&self) -> usize {
        *self.inner.list_requests.borrow()
    }

    /// How many watch requests arrived (including ones answered with 410).
    pub fn watch_requests(&self) -> usize {
        *self.inner.watch_requests.borrow()
    }

    /// How many watch streams are open right now.
    pub fn open_watches(&self) -> usize {
        *self.inner.open_watches.borrow()
    }

    /// Resolves once at least `n` watch streams are open (registered server-side: every event
    /// applied after this resolves reaches them).
    pub async fn wait_for_watchers(&self, n: usize) {
        wait_at_least(&self.inner.open_watches, n).await;
    }

    /// Resolves once at least `n` list requests have arrived in total.
    pub async fn wait_for_list_requests(&self, n: usize) {
        wait_at_least(&self.inner.list_requests, n).await;
    }

    /// Resolves once at least `n` watch requests have arrived in total.
    pub async fn wait_for_watch_requests(&self, n: usize) {
        wait_at_least(&self.inner.watch_requests, n).await;
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner.log.lock().unwrap().clone()
    }

    /// Requests for paths this fake does not serve (answered 404), as `METHOD target`.
    pub fn unknown_requests(&self) -> Vec<String> {
        self.inner.state().unknown.clone()
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        let Ok(mut net) = self.inner.net.lock() else {
            return;
        };
        if let Some(accept) = net.accept.take() {
            accept.abort();
        }
        for conn in net.conns.drain(..) {
            conn.abort();
        }
    }
}

/// How `end_watches` ends a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndHow {
    /// Tear the connection down mid-body.
    Abort,
    /// Finish the chunked body properly.
    Clean,
}

// ---------------------------------------------------------------------------------------------
// Node builder
// ---------------------------------------------------------------------------------------------

/// Starts a Node named `name` with label `app=clearml` (and `kubernetes.io/hostname=name`),
/// condition Ready=True, and no addresses (add them with `internal_ip` etc).
pub fn node(name: &str) -> NodeBuilder {
    let mut labels = BTreeMap::new();
    labels.insert("app".to_string(), "clearml".to_string());
    labels.insert("kubernetes.io/hostname".to_string(), name.to_string());
    NodeBuilder {
        name: name.to_string(),
        labels,
        annotations: BTreeMap::new(),
        addresses: Vec::new(),
        ready: "True".to_string(),
        unschedulable: false,
        taints: Vec::new(),
        deleting: false,
    }
}

/// Builds a core/v1 Node as JSON. See [`node`].
#[derive(Debug, Clone)]
pub struct NodeBuilder {
    name: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    addresses: Vec<(String, String)>,
    ready: String,
    unschedulable: bool,
    taints: Vec<(String, String)>,
    deleting: bool,
}

impl NodeBuilder {
    /// Sets a label (replacing any value).
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    /// Removes a label (e.g. `without_label("app")` for an unselected node).
    pub fn without_label(mut self, key: &str) -> Self {
        self.labels.remove(key);
        self
    }

    /// Sets an annotation.
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_string(), value.to_string());
        self
    }

    /// Appends a `status.addresses` entry of any type (e.g. `InternalDNS`).
    pub fn address(mut self, kind: &str, address: &str) -> Self {
        self.addresses.push((kind.to_string(), address.to_string()));
        self
    }

    /// Appends an `InternalIP` address (call twice for dual-stack).
    pub fn internal_ip(self, ip: &str) -> Self {
        self.address("InternalIP", ip)
    }

    /// Appends an `ExternalIP` address.
    pub fn external_ip(self, ip: &str) -> Self {
        self.address("ExternalIP", ip)
    }

    /// Appends a `Hostname` address.
    pub fn hostname(self, host: &str) -> Self {
        self.address("Hostname", host)
    }

    /// Ready condition `True` / `False`.
    pub fn ready(self, ready: bool) -> Self {
        self.ready_status(if ready { "True" } else { "False" })
    }

    /// Ready condition status verbatim (`"True"`, `"False"`, `"Unknown"`). Like the node
    /// lifecycle controller, `False` adds the `node.kubernetes.io/not-ready` taints and
    /// `Unknown` the `node.kubernetes.io/unreachable` taints (NoSchedule + NoExecute).
    pub fn ready_status(mut self, status: &str) -> Self {
        self.ready = status.to_string();
        self
    }

    /// `spec.unschedulable` (cordon); `true` also adds the
    /// `node.kubernetes.io/unschedulable:NoSchedule` taint as the real control plane does.
    pub fn unschedulable(mut self, yes: bool) -> Self {
        self.unschedulable = yes;
        self
    }

    /// Appends a taint to `spec.taints` (e.g. `taint("ToBeDeletedByClusterAutoscaler",
    /// "NoSchedule")`).
    pub fn taint(mut self, key: &str, effect: &str) -> Self {
        self.taints.push((key.to_string(), effect.to_string()));
        self
    }

    /// Sets `metadata.deletionTimestamp` (and a finalizer, as a node held for deletion has).
    pub fn deleting(mut self) -> Self {
        self.deleting = true;
        self
    }

    /// The Node as JSON (`apiVersion: v1`, `kind: Node`).
    pub fn build(self) -> Value {
        let mut taints: Vec<Value> = Vec::new();
        let mut add_taint = |key: &str, effect: &str| {
            let mut t = json!({ "key": key, "effect": effect });
            if effect == "NoExecute" {
                t["timeAdded"] = json!("2025-01-01T00:00:00Z");
            }
            taints.push(t);
        };
        if self.unschedulable {
            add_taint("node.kubernetes.io/unschedulable", "NoSchedule");
        }
        match self.ready.as_str() {
            "False" => {
                add_taint("node.kubernetes.io/not-ready", "NoSchedule");
                add_taint("node.kubernetes.io/not-ready", "NoExecute");
            }
            "Unknown" => {
                add_taint("node.kubernetes.io/unreachable", "NoSchedule");
                add_taint("node.kubernetes.io/unreachable", "NoExecute");
            }
            _ => {}
        }
        for (key, effect) in &self.taints {
            add_taint(key, effect);
        }

        let mut metadata = json!({ "name": self.name, "labels": self.labels });
        if !self.annotations.is_empty() {
            metadata["annotations"] = json!(self.annotations);
        }
        if self.deleting {
            metadata["deletionTimestamp"] = json!("2025-01-01T00:10:00Z");
            metadata["deletionGracePeriodSeconds"] = json!(0);
            metadata["finalizers"] = json!(["example.com/hold"]);
        }

        let mut spec = Map::new();
        if self.unschedulable {
            spec.insert("unschedulable".into(), json!(true));
        }
        if !taints.is_empty() {
            spec.insert("taints".into(), Value::Array(taints));
        }

        let (reason, message) = match self.ready.as_str() {
            "True" => ("KubeletReady", "kubelet is posting ready status"),
            "False" => ("KubeletNotReady", "container runtime network not ready"),
            _ => ("NodeStatusUnknown", "Kubelet stopped posting node status."),
        };
        let addresses: Vec<Value> = self
            .addresses
            .iter()
            .map(|(t, a)| json!({ "type": t, "address": a }))
            .collect();
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": metadata,
            "spec": spec,
            "status": {
                "addresses": addresses,
                "conditions": [{
                    "type": "Ready",
                    "status": self.ready,
                    "reason": reason,
                    "message": message,
                    "lastHeartbeatTime": "2025-01-01T00:00:00Z",
                    "lastTransitionTime": "2025-01-01T00:00:00Z",
                }],
                "daemonEndpoints": { "kubeletEndpoint": { "Port": 10250 } },
                "nodeInfo": {
                    "architecture": "amd64",
                    "bootID": "",
                    "containerRuntimeVersion": "containerd://1.7.0",
                    "kernelVersion": "6.1.0",
                    "kubeProxyVersion": "v1.33.0",
                    "kubeletVersion": "v1.33.0",
                    "machineID": "",
                    "operatingSystem": "linux",
                    "osImage": "Fake Linux",
                    "systemUUID": "",
                },
            },
        })
    }
}

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

struct Inner {
    state: Mutex<State>,
    net: Mutex<Net>,
    log: Mutex<Vec<RecordedRequest>>,
    open_watches: watch::Sender<usize>,
    list_requests: watch::Sender<usize>,
    watch_requests: watch::Sender<usize>,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn net(&self) -> MutexGuard<'_, Net> {
        self.net.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remove_watcher(&self, id: u64) {
        let mut st = self.state();
        if st.watchers.remove(&id).is_some() {
            let n = st.watchers.len();
            drop(st);
            self.open_watches.send_replace(n);
        }
    }
}

#[derive(Default)]
struct Net {
    down: bool,
    accept: Option<JoinHandle<()>>,
    conns: Vec<JoinHandle<()>>,
}

#[derive(Default)]
struct State {
    nodes: BTreeMap<String, Value>,
    rv: u64,
    /// Watches from a resourceVersion below this get 410.
    floor: u64,
    history: Vec<StoredEvent>,
    watchers: HashMap<u64, Watcher>,
    next_watcher: u64,
    fail: Option<u16>,
    unknown: Vec<String>,
}

impl State {
    /// Appends to history and fans out to open watches.
    fn record(&mut self, ev: StoredEvent) {
        self.watchers
            .retain(|_, w| match convert(&ev, &w.selector) {
                None => true,
                Some((kind, obj)) => w.tx.send(Msg::Line(event_line(kind, &obj))).is_ok(),
            });
        self.history.push(ev);
    }
}

#[derive(Clone)]
struct StoredEvent {
    kind: EventType,
    rv: u64,
    /// New state (for DELETED: the last state with the deletion's resourceVersion).
    object: Value,
    /// Previous state (MODIFIED, DELETED).
    old: Option<Value>,
}

struct Watcher {
    selector: Selector,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Msg>,
}

#[derive(Clone)]
enum Msg {
    Line(Bytes),
    End,
    Abort,
}

/// What a watcher with `selector` sees of `ev`, as the real watch cache does it: a MODIFIED
/// that makes an object match is ADDED, one that makes it stop matching is DELETED (with the
/// previous object at the new resourceVersion).
fn convert(ev: &StoredEvent, selector: &Selector) -> Option<(&'static str, Value)> {
    let now = selector.matches(&ev.object);
    let before = ev.old.as_ref().is_some_and(|o| selector.matches(o));
    match ev.kind {
        EventType::Added => now.then(|| ("ADDED", ev.object.clone())),
        EventType::Deleted => before.then(|| ("DELETED", ev.object.clone())),
        EventType::Modified => match (before, now) {
            (true, true) => Some(("MODIFIED", ev.object.clone())),
            (false, true) => Some(("ADDED", ev.object.clone())),
            (true, false) => {
                let mut old = ev.old.clone().expect("old object");
                old["metadata"]["resourceVersion"] = json!(ev.rv.to_string());
                Some(("DELETED", old))
            }
            (false, false) => None,
        },
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": kind, "object": object }))
        .expect("serialize watch event");
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark_object(rv: u64) -> Value {
    json!({ "kind": "Node", "apiVersion": "v1", "metadata": { "resourceVersion": rv.to_string() } })
}

async fn wait_at_least(counter: &watch::Sender<usize>, n: usize) {
    let mut rx = counter.subscribe();
    rx.wait_for(|v| *v >= n).await.expect("fake kube alive");
}

fn bump(counter: &watch::Sender<usize>) {
    counter.send_modify(|v| *v += 1);
}

// ---------------------------------------------------------------------------------------------
// Label selectors
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct Selector(Vec<Requirement>);

#[derive(Debug, Clone)]
enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Selector {
    fn parse(text: &str) -> Result<Selector, String> {
        let mut reqs = Vec::new();
        let mut depth = 0;
        let mut start = 0;
        let bytes = text.as_bytes();
        let mut terms = Vec::new();
        for (i, b) in bytes.iter().enumerate() {
            match b {
                b'(' => depth += 1,
                b')' => depth -= 1,
                b',' if depth == 0 => {
                    terms.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        terms.push(&text[start..]);
        for term in terms {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            reqs.push(Requirement::parse(term)?);
        }
        Ok(Selector(reqs))
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = obj["metadata"]["labels"].as_object();
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Eq(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEq(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        })
    }
}

impl Requirement {
    fn parse(term: &str) -> Result<Requirement, String> {
        let s = |x: &str| x.trim().to_string();
        if let Some(key) = term.strip_prefix('!') {
            return Ok(Requirement::NotExists(s(key)));
        }
        if let Some((k, v)) = term.split_once("!=") {
            return Ok(Requirement::NotEq(s(k), s(v)));
        }
        if let Some((k, v)) = term.split_once("==") {
            return Ok(Requirement::Eq(s(k), s(v)));
        }
        if let Some((k, v)) = term.split_once('=') {
            return Ok(Requirement::Eq(s(k), s(v)));
        }
        let set = |rest: &str| -> Result<Vec<String>, String> {
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| format!("bad set in selector term {term:?}"))?;
            Ok(inner.split(',').map(s).filter(|v| !v.is_empty()).collect())
        };
        let mut words = term.splitn(2, char::is_whitespace);
        let key = words.next().unwrap_or_default();
        let rest = words.next().unwrap_or_default().trim_start();
        if rest.is_empty() {
            return Ok(Requirement::Exists(s(key)));
        }
        if let Some(r) = rest.strip_prefix("notin") {
            return Ok(Requirement::NotIn(s(key), set(r)?));
        }
        if let Some(r) = rest.strip_prefix("in") {
            return Ok(Requirement::In(s(key), set(r)?));
        }
        Err(format!("unable to parse requirement: {term:?}"))
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

async fn rebind(addr: SocketAddr) -> TcpListener {
    // tokio sets SO_REUSEADDR, so TIME_WAIT leftovers do not block the rebind; another socket
    // grabbing the port in between would, hence a few attempts.
    let mut last = None;
    for _ in 0..50 {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("fake kube-apiserver could not rebind {addr}: {last:?}");
}

fn spawn_accept(inner: Arc<Inner>, listener: TcpListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let conn_inner = inner.clone();
            let task = tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let inner = conn_inner.clone();
                    async move { Ok::<_, Infallible>(handle(inner, req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
            let mut net = inner.net();
            net.conns.retain(|c| !c.is_finished());
            net.conns.push(task);
        }
    })
}

fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Response<RespBody> {
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    inner.log.lock().unwrap().push(RecordedRequest {
        method: req.method().to_string(),
        target: target.clone(),
        authorization: req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    });
    if let Some(code) = inner.state().fail {
        return status_response(code, "injected failure");
    }

    let path = req.uri().path();
    let query = parse_query(req.uri().query().unwrap_or(""));
    let method = req.method().clone();
    match path {
        "/api/v1/nodes" | "/api/v1/nodes/" => {
            if method != Method::GET {
                return status_response(405, "the fake only serves GET on nodes");
            }
            let selector = match Selector::parse(query.get("labelSelector").map_or("", |s| s)) {
                Ok(s) => s,
                Err(e) => return status_response(400, &e),
            };
            let is_watch = matches!(
                query.get("watch").map(String::as_str),
                Some("true" | "1" | "True")
            );
            if is_watch {
                watch_nodes(&inner, &query, selector)
            } else {
                list_nodes(&inner, &query, &selector)
            }
        }
        "/version" => json_response(
            StatusCode::OK,
            &json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0-fake",
                "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
                "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24.0", "compiler": "gc",
                "platform": "linux/amd64",
            }),
        ),
        "/healthz" | "/livez" | "/readyz" => Response::builder()
            .status(StatusCode::OK)
            .header(CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(full("ok"))
            .expect("response"),
        _ => {
            if let Some(name) = path.strip_prefix("/api/v1/nodes/") {
                if method == Method::GET && !name.contains('/') {
                    return match inner.state().nodes.get(name) {
                        Some(n) => json_response(StatusCode::OK, n),
                        None => status_response(404, &format!("nodes \"{name}\" not found")),
                    };
                }
            }
            let line = format!("{method} {target}");
            eprintln!("fake kube-apiserver: unknown request {line}");
            inner.state().unknown.push(line);
            status_response(404, "the server could not find the requested resource")
        }
    }
}

fn list_nodes(
    inner: &Inner,
    query: &HashMap<String, String>,
    selector: &Selector,
) -> Response<RespBody> {
    bump(&inner.list_requests);
    let st = inner.state();
    // Continue token: "<rv>/<last name>"; the list rv is the first page's.
    let (list_rv, after) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => match token.split_once('/') {
            Some((rv, name)) => match rv.parse::<u64>() {
                Ok(rv) => (rv, Some(name.to_string())),
                Err(_) => return status_response(400, "invalid continue token"),
            },
            None => return status_response(400, "invalid continue token"),
        },
        None => (st.rv, None),
    };
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let mut items = Vec::new();
    let mut continue_token = None;
    for (name, obj) in &st.nodes {
        if after.as_ref().is_some_and(|a| name <= a) || !selector.matches(obj) {
            continue;
        }
        if limit.is_some_and(|l| items.len() >= l) {
            continue_token = Some(format!("{list_rv}/{}", items_last_name(&items)));
            break;
        }
        let mut item = obj.clone();
        if let Some(o) = item.as_object_mut() {
            // The real server omits these on list items.
            o.remove("kind");
            o.remove("apiVersion");
        }
        items.push(item);
    }
    drop(st);
    let mut metadata = json!({ "resourceVersion": list_rv.to_string() });
    if let Some(token) = continue_token {
        metadata["continue"] = json!(token);
    }
    json_response(
        StatusCode::OK,
        &json!({ "kind": "NodeList", "apiVersion": "v1", "metadata": metadata, "items": items }),
    )
}

fn items_last_name(items: &[Value]) -> String {
    items
        .last()
        .and_then(|i| i["metadata"]["name"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn watch_nodes(
    inner: &Arc<Inner>,
    query: &HashMap<String, String>,
    selector: Selector,
) -> Response<RespBody> {
    bump(&inner.watch_requests);
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .map(Duration::from_secs);
    let bookmarks = matches!(
        query.get("allowWatchBookmarks").map(String::as_str),
        Some("true" | "1" | "True")
    );
    let from = query.get("resourceVersion").cloned().unwrap_or_default();

    let mut st = inner.state();
    let mut queue = VecDeque::new();
    if from.is_empty() || from == "0" {
        // "Start at most recent": synthetic ADDED for everything that matches.
        for obj in st.nodes.values().filter(|o| selector.matches(o)) {
            queue.push_back(event_line("ADDED", obj));
        }
    } else {
        let Ok(r) = from.parse::<u64>() else {
            return status_response(400, &format!("invalid resource version: {from:?}"));
        };
        if r < st.floor {
            let status = status_json(
                410,
                &format!("too old resource version: {r} ({})", st.floor),
            );
            drop(st);
            let (_, rx) = mpsc::unbounded_channel();
            let body = WatchBody {
                queue: VecDeque::from([event_line("ERROR", &status)]),
                rx,
                deadline: None,
                finished: false,
                aborting: false,
                guard: None,
            };
            return watch_response(body);
        }
        for ev in st.history.iter().filter(|e| e.rv > r) {
            if let Some((kind, obj)) = convert(ev, &selector) {
                queue.push_back(event_line(kind, &obj));
            }
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let id = st.next_watcher;
    st.next_watcher += 1;
    st.watchers.insert(
        id,
        Watcher {
            selector,
            bookmarks,
            tx,
        },
    );
    let n = st.watchers.len();
    drop(st);
    inner.open_watches.send_replace(n);
    watch_response(WatchBody {
        queue,
        rx,
        deadline: timeout.map(|t| Box::pin(tokio::time::sleep(t))),
        finished: false,
        aborting: false,
        guard: Some(WatcherGuard {
            inner: inner.clone(),
            id,
        }),
    })
}

fn watch_response(body: WatchBody) -> Response<RespBody> {
    let mut resp = Response::new(body.boxed());
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    resp
}

/// Deregisters a watcher when its response body is dropped (client went away, connection
/// aborted, or stream finished).
struct WatcherGuard {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.inner.remove_watcher(self.id);
    }
}

struct WatchBody {
    queue: VecDeque<Bytes>,
    rx: mpsc::UnboundedReceiver<Msg>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    finished: bool,
    /// An abort was requested; fail on the next poll, after hyper has flushed what it has.
    aborting: bool,
    guard: Option<WatcherGuard>,
}

impl WatchBody {
    fn finish(&mut self) {
        self.finished = true;
        self.guard = None;
    }
}

impl HttpBody for WatchBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        if this.aborting {
            this.finish();
            return Poll::Ready(Some(Err("watch dropped by the test".into())));
        }
        if let Some(line) = this.queue.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(line))));
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(Msg::Line(line))) => return Poll::Ready(Some(Ok(Frame::data(line)))),
            Poll::Ready(Some(Msg::End)) | Poll::Ready(None) => {
                this.finish();
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Msg::Abort)) => {
                // Returning Pending makes hyper flush the events already written (so a
                // bookmark sent just before the drop is not lost in hyper's buffer); the
                // error then tears the connection down without a terminating chunk.
                this.aborting = true;
                this.guard = None;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Pending => {}
        }
        if let Some(deadline) = this.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                this.finish();
                return Poll::Ready(None);
            }
        }
        Poll::Pending
    }
}

fn full(data: impl Into<Bytes>) -> RespBody {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

fn json_response(status: StatusCode, value: &Value) -> Response<RespBody> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(full(serde_json::to_vec(value).expect("serialize")))
        .expect("response")
}

fn status_json(code: u16, message: &str) -> Value {
    let reason = match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    };
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {},
        "code": code,
    })
}

fn status_response(code: u16, message: &str) -> Response<RespBody> {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &status_json(code, message))
}

fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (form_decode(k), form_decode(v))
        })
        .collect()
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space, `%XX` a byte).
fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(b)) => {
                out.push(b);
                i += 2;
            }
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
