//! The fake Kubernetes API server (tests/support/kube.rs) against the REAL kube-rs client and
//! `kube::runtime::watcher`, over a socket, configured from the kubeconfig the fake writes.

#[path = "support/kube.rs"]
mod kube_fake;

use std::time::Duration;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{reflector, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use kube_fake::{node, EndHow, FakeKube, FAKE_TOKEN};

/// Safety net so a bug fails the test instead of hanging it; not a speed assertion.
const LIMIT: Duration = Duration::from_secs(20);

async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A real kube-rs client, built exactly as the proxy will: kubeconfig file -> Config -> Client.
async fn client(fake: &FakeKube) -> Client {
    let kubeconfig =
        kube::config::Kubeconfig::read_from(fake.kubeconfig()).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config from kubeconfig");
    Client::try_from(config).expect("client from config")
}

fn watch_config() -> watcher::Config {
    watcher::Config::default().labels("app=clearml")
}

/// A watcher stream driven by its own task, as the proxy will run it. Driving it matters:
/// kube's watcher sends the watch request only when polled after `InitDone`, so a test that
/// awaits `wait_for_watchers` cannot be the one polling.
struct Watch {
    rx: mpsc::UnboundedReceiver<Result<Event<Node>, String>>,
    task: JoinHandle<()>,
    /// Errors the watcher yielded (expected around dropped or refused connections).
    errors: Vec<String>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watch {
    fn spawn<S>(stream: S) -> Watch
    where
        S: Stream<Item = Result<Event<Node>, watcher::Error>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                if tx.send(item.map_err(|e| e.to_string())).is_err() {
                    return;
                }
            }
        });
        Watch {
            rx,
            task,
            errors: Vec::new(),
        }
    }

    /// `watcher(Api::<Node>::all(client), Config::default().labels("app=clearml"))`
    async fn nodes(fake: &FakeKube) -> Watch {
        Watch::with(fake, watch_config()).await
    }

    async fn with(fake: &FakeKube, config: watcher::Config) -> Watch {
        Watch::spawn(watcher::watcher(
            Api::<Node>::all(client(fake).await),
            config,
        ))
    }

    /// Same as `nodes`, with `.default_backoff()`.
    async fn nodes_with_backoff(fake: &FakeKube) -> Watch {
        let api = Api::<Node>::all(client(fake).await);
        Watch::spawn(watcher::watcher(api, watch_config()).default_backoff())
    }

    /// The next successful event; errors are collected into `self.errors`.
    async fn next_ok(&mut self) -> Event<Node> {
        let (rx, errors) = (&mut self.rx, &mut self.errors);
        within("a watcher event", async {
            loop {
                match rx.recv().await.expect("watcher stream never ends") {
                    Ok(ev) => return ev,
                    Err(e) => errors.push(e),
                }
            }
        })
        .await
    }

    /// Consumes Init, InitApply*, InitDone; returns the names applied, in order.
    async fn init(&mut self) -> Vec<String> {
        match self.next_ok().await {
            Event::Init => {}
            other => panic!("expected Init, got {}", describe(&other)),
        }
        let mut names = Vec::new();
        loop {
            match self.next_ok().await {
                Event::InitApply(n) => names.push(n.name_any()),
                Event::InitDone => return names,
                other => panic!("expected InitApply/InitDone, got {}", describe(&other)),
            }
        }
    }

    async fn apply(&mut self, name: &str) -> Node {
        match self.next_ok().await {
            Event::Apply(n) if n.name_any() == name => n,
            other => panic!("expected Apply({name}), got {}", describe(&other)),
        }
    }

    async fn delete(&mut self, name: &str) -> Node {
        match self.next_ok().await {
            Event::Delete(n) if n.name_any() == name => n,
            other => panic!("expected Delete({name}), got {}", describe(&other)),
        }
    }
}

fn describe(ev: &Event<Node>) -> String {
    match ev {
        Event::Apply(n) => format!("Apply({})", n.name_any()),
        Event::Delete(n) => format!("Delete({})", n.name_any()),
        Event::Init => "Init".into(),
        Event::InitApply(n) => format!("InitApply({})", n.name_any()),
        Event::InitDone => "InitDone".into(),
    }
}

fn ready_status(n: &Node) -> String {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.clone())
        .unwrap_or_default()
}

fn addresses(n: &Node) -> Vec<(String, String)> {
    n.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(|a| {
            a.iter()
                .map(|a| (a.type_.clone(), a.address.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn pair(a: &str, b: &str) -> (String, String) {
    (a.to_string(), b.to_string())
}

/// One query parameter of a recorded request target (raw, still percent-encoded).
fn param(target: &str, key: &str) -> String {
    let query = target.split_once('?').map_or("", |(_, q)| q);
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("{target} has no {key}"))
        .to_string()
}

fn watch_targets(fake: &FakeKube) -> Vec<String> {
    fake.requests()
        .into_iter()
        .filter(|r| r.target.contains("watch=true"))
        .map(|r| r.target)
        .collect()
}

#[tokio::test]
async fn initial_list_yields_only_labelled_nodes() {
    let fake = FakeKube::start().await;
    fake.apply(
        node("b")
            .internal_ip("10.0.0.2")
            .external_ip("203.0.113.2")
            .hostname("b.example")
            .build(),
    );
    fake.apply(
        node("a")
            .internal_ip("10.0.0.1")
            .ready_status("Unknown")
            .build(),
    );
    fake.apply(
        node("c")
            .without_label("app")
            .internal_ip("10.0.0.3")
            .build(),
    );
    fake.apply(
        node("d")
            .label("app", "other")
            .internal_ip("10.0.0.4")
            .build(),
    );

    let mut watch = Watch::nodes(&fake).await;
    assert_eq!(watch.init().await, ["a", "b"]);
    within("the watch", fake.wait_for_watchers(1)).await;
    assert!(watch.errors.is_empty(), "{:?}", watch.errors);

    // Fields survive the trip through the real client types.
    let api = Api::<Node>::all(client(&fake).await);
    let b = api.get("b").await.expect("get b");
    assert_eq!(
        addresses(&b),
        [
            pair("InternalIP", "10.0.0.2"),
            pair("ExternalIP", "203.0.113.2"),
            pair("Hostname", "b.example"),
        ]
    );
    assert_eq!(ready_status(&b), "True");
    assert_eq!(b.labels()["app"], "clearml");
    let a = api.get("a").await.expect("get a");
    assert_eq!(ready_status(&a), "Unknown");
    let taints = a.spec.unwrap().taints.unwrap();
    assert!(taints
        .iter()
        .any(|t| t.key == "node.kubernetes.io/unreachable"));

    // What the client sent: no discovery, a selector-filtered paged list, then a watch from
    // the list's resourceVersion with bookmarks; all with the kubeconfig's bearer token.
    assert!(
        fake.unknown_requests().is_empty(),
        "{:?}",
        fake.unknown_requests()
    );
    let reqs = fake.requests();
    let list = &reqs[0];
    assert_eq!(list.method, "GET");
    assert!(list.target.starts_with("/api/v1/nodes?"), "{}", list.target);
    assert_eq!(param(&list.target, "labelSelector"), "app%3Dclearml");
    assert_eq!(param(&list.target, "limit"), "500");
    assert!(!list.target.contains("watch"), "{}", list.target);
    let bearer = format!("Bearer {FAKE_TOKEN}");
    assert_eq!(list.authorization.as_deref(), Some(bearer.as_str()));
    let w = &reqs[1];
    for (key, value) in [
        ("watch", "true"),
        ("allowWatchBookmarks", "true"),
        ("timeoutSeconds", "290"),
        ("labelSelector", "app%3Dclearml"),
        ("resourceVersion", "4"),
    ] {
        assert_eq!(param(&w.target, key), value, "{}", w.target);
    }
    println!("list: {}\nwatch: {}", list.target, w.target);
    assert_eq!(w.authorization.as_deref(), Some(bearer.as_str()));
    assert_eq!(fake.list_requests(), 1);
    assert_eq!(fake.watch_requests(), 1);
}

#[tokio::test]
async fn apply_modify_and_delete_arrive_as_events() {
    let fake = FakeKube::start().await;
    fake.apply(node("a").internal_ip("10.0.0.1").build());
    let mut watch = Watch::nodes(&fake).await;
    assert_eq!(watch.init().await, ["a"]);
    within("the watch", fake.wait_for_watchers(1)).await;

    fake.apply(node("b").internal_ip("10.0.0.2").build());
    let b = watch.apply("b").await;
    assert_eq!(addresses(&b), [pair("InternalIP", "10.0.0.2")]);

    fake.modify("a", |n| {
        n["status"]["conditions"][0]["status"] = "False".into()
    });
    let a = watch.apply("a").await;
    assert_eq!(ready_status(&a), "False");

    // Unlabelled nodes are invisible: the next event is e's.
    fake.apply(node("c").without_label("app").build());
    fake.delete("c");
    fake.apply(
        node("e")
            .unschedulable(true)
            .deleting()
            .taint("ToBeDeletedByClusterAutoscaler", "NoSchedule")
            .build(),
    );
    let e = watch.apply("e").await;
    assert!(e.metadata.deletion_timestamp.is_some());
    let spec = e.spec.unwrap();
    assert_eq!(spec.unschedulable, Some(true));
    let taints: Vec<_> = spec.taints.unwrap().into_iter().map(|t| t.key).collect();
    assert_eq!(
        taints,
        [
            "node.kubernetes.io/unschedulable",
            "ToBeDeletedByClusterAutoscaler"
        ]
    );

    let rv = fake.delete("b").expect("b existed");
    assert_eq!(rv, fake.resource_version());
    let b = watch.delete("b").await;
    assert_eq!(b.resource_version(), Some(rv.to_string()));
    assert_eq!(fake.delete("nope"), None);

    assert!(watch.errors.is_empty(), "{:?}", watch.errors);
    assert_eq!(fake.list_requests(), 1);
    assert_eq!(fake.watch_requests(), 1);
}

#[tokio::test]
async fn label_removed_is_delete_and_label_added_is_apply() {
    let fake = FakeKube::start().await;
    fake.apply(node("a").internal_ip("10.0.0.1").build());
    fake.apply(
        node("b")
            .without_label("app")
            .internal_ip("10.0.0.2")
            .build(),
    );
    let mut watch = Watch::nodes(&fake).await;
    assert_eq!(watch.init().await, ["a"]);
    within("the watch", fake.wait_for_watchers(1)).await;

    fake.apply(
        node("a")
            .without_label("app")
            .internal_ip("10.0.0.1")
            .build(),
    );
    let a = watch.delete("a").await;
    // Like the real watch cache: the last matching state, at the new resourceVersion.
    assert_eq!(a.labels()["app"], "clearml");
    assert_eq!(
        a.resource_version(),
        Some(fake.resource_version().to_string())
    );

    fake.modify("b", |n| n["metadata"]["labels"]["app"] = "clearml".into());
    let b = watch.apply("b").await;
    assert_eq!(b.labels()["app"], "clearml");
    assert!(watch.errors.is_empty(), "{:?}", watch.errors);
}

#[tokio::test]
async fn dropped_watch_resumes_without_relist() {
    let fake = FakeKube::start().await;
    fake.apply(node("a").internal_ip("10.0.0.1").build());
    let mut watch = Watch::nodes(&fake).await;
    assert_eq!(watch.init().await, ["a"]);
    within("the watch", fake.wait_for_watchers(1)).await;

    // Abrupt: the connection dies mid-body. The change made meanwhile is replayed.
    assert_eq!(fake.drop_watches(), 1);
    assert_eq!(fake.open_watches(), 0);
    fake.apply(node("b").internal_ip("10.0.0.2").build());
    watch.apply("b").await;
    within("the second watch", fake.wait_for_watchers(1)).await;

    // Clean end, as a server-side timeout does.
    assert_eq!(fake.end_watches(EndHow::Clean), 1);
    fake.delete("a");
    watch.delete("a").await;
    within("the third watch", fake.wait_for_watchers(1)).await;

    assert_eq!(
        fake.list_requests(),
        1,
        "a dropped watch must resume, not relist"
    );
    // Each re-watch resumes from the last resourceVersion the client saw.
    let targets = watch_targets(&fake);
    assert_eq!(targets.len(), 3, "{targets:?}");
    assert_eq!(param(&targets[1], "resourceVersion"), "1", "{targets:?}");
    assert_eq!(param(&targets[2], "resourceVersion"), "2", "{targets:?}");
    println!("errors around the drops: {:?}", watch.errors);
}

#[tokio::test]
async fn expired_history_forces_a_fresh_relist() {
    let fake = FakeKube::start().await;
    fake.apply(node("a").internal_ip("10.0.0.1").build());
    fake.apply(node("b").internal_ip("10.0.0.2").build());
    let mut watch = Watch::nodes(&fake).await;
    assert_eq!(watch.init().await, ["a", "b"]);
    within("the watch", fake.wait_for_watchers(1)).await;

    fake.expire_history();
    fake.drop_watches();
    // The re-watch from the old resourceVersion gets 410 Expired, then a relist.
    assert_eq!(watch.init().await, ["a", "b"]);
    assert!(
        watch.errors.iter().any(|e| e.contains("Expired")),
        "{:?}",
        watch.errors
    );
    assert_eq!(fake.list_requests(), 2);
    println!("errors around the expiry: {:?}", watch.errors);

    // And the new watch (from the relist's resourceVersion) works.
    fake.apply(node("c").internal_ip("10.0.0.3").build());
    watch.apply("c").await;
}

#[tokio::test]
async fn server_down_then_up_on_the_same_port_relists_the_right_set() {
    let fake = FakeKube::start().await;
    fake.apply(node("a").internal_ip("10.0.0.1").build());
    fake.apply(node("b").internal_ip("10.0.0.2").build());
    let addr = fake.addr();
    let mut watch = Watch::nodes_with_backoff(&fake).await;
    assert_eq!(watch.init().await, ["a", "b"]);
    within("the watch", fake.wait_for_watchers(1)).await;

    within("the server to go down", fake.set_down(true)).await;
    assert!(fake.is_down());
    assert_eq!(fake.open_watches(), 0);
    let refused = Api::<Node>::all(client(&fake).await)
        .list(&ListParams::default())
        .await;
    assert!(refused.is_err(), "a down server must refuse");

    // Missed while down, and compacted away: the client cannot catch up by watching.
    fake.delete("a");
    fake.apply(node("c").internal_ip("10.0.0.3").build());
    fake.expire_history();
    within("the server to come up", fake.set_down(false)).await;
    assert_eq!(fake.addr(), addr);
    assert!(!fake.is_down());

    assert_eq!(watch.init().await, ["b", "c"]);
    assert!(
        !watch.errors.is_empty(),
        "the outage should have surfaced as errors"
    );
    fake.apply(node("d").internal_ip("10.0.0.4").build());
    watch.apply("d").await;
    println!("errors around the outage: {:?}", watch.errors);
}

#[tokio::test]
async fn bookmarks_move_the_resume_point_and_break_nothing() {
    let fake = FakeKube::start().await;
    fake.apply(node("a").internal_ip("10.0.0.1").build());
    let mut watch = Watch::nodes(&fake).await;
    assert_eq!(watch.init().await, ["a"]);
    within("the watch", fake.wait_for_watchers(1)).await;

    // An invisible change moves the resourceVersion; the bookmark carries it.
    fake.apply(node("x").without_label("app").build());
    assert_eq!(fake.bookmark(), 1);
    fake.apply(node("b").internal_ip("10.0.0.2").build());
    watch.apply("b").await;

    fake.apply(node("y").without_label("app").build());
    assert_eq!(fake.bookmark(), 1);
    let want = fake.resource_version().to_string();
    fake.drop_watches();
    fake.apply(node("c").internal_ip("10.0.0.3").build());
    watch.apply("c").await;
    // Only possible if the client resumed from the last bookmark, not from b's version.
    let targets = watch_targets(&fake);
    assert_eq!(param(&targets[1], "resourceVersion"), want, "{targets:?}");
    assert_eq!(fake.list_requests(), 1);
}

#[tokio::test]
async fn reflector_store_follows_the_fake() {
    let fake = FakeKube::start().await;
    fake.apply(node("a").internal_ip("10.0.0.1").build());
    fake.apply(node("b").internal_ip("10.0.0.2").build());
    let (reader, writer) = reflector::store::<Node>();
    let stream = watcher::watcher(Api::<Node>::all(client(&fake).await), watch_config())
        .default_backoff()
        .reflect(writer);
    let mut watch = Watch::spawn(stream);
    within("the store", reader.wait_until_ready())
        .await
        .expect("store ready");
    let names = || {
        let mut names: Vec<_> = reader.state().iter().map(|n| n.name_any()).collect();
        names.sort();
        names
    };
    assert_eq!(names(), ["a", "b"]);

    within("the watch", fake.wait_for_watchers(1)).await;
    fake.delete("a");
    fake.apply(node("c").internal_ip("10.0.0.3").build());
    loop {
        if let Event::Apply(n) = watch.next_ok().await {
            if n.name_any() == "c" {
                break;
            }
        }
    }
    assert_eq!(names(), ["b", "c"]);

    // A relist swaps the store's contents wholesale (b's deletion is never seen as an event).
    within("the server to go down", fake.set_down(true)).await;
    fake.delete("b");
    fake.expire_history();
    within("the server to come up", fake.set_down(false)).await;
    assert_eq!(watch.init().await, ["c"]);
    assert_eq!(names(), ["c"]);
}

#[tokio::test]
async fn list_honours_label_selectors_and_paging() {
    let fake = FakeKube::start().await;
    fake.apply(node("a").label("tier", "edge").build());
    fake.apply(node("b").label("tier", "core").build());
    fake.apply(node("c").without_label("app").build());
    fake.apply(node("d").label("app", "other").build());
    let api = Api::<Node>::all(client(&fake).await);
    let names = |sel: &'static str| {
        let api = api.clone();
        async move {
            let list = api
                .list(&ListParams::default().labels(sel))
                .await
                .expect(sel);
            list.items.iter().map(|n| n.name_any()).collect::<Vec<_>>()
        }
    };
    assert_eq!(names("app=clearml").await, ["a", "b"]);
    assert_eq!(names("app==clearml").await, ["a", "b"]);
    assert_eq!(names("app!=clearml").await, ["c", "d"]);
    assert_eq!(names("app").await, ["a", "b", "d"]);
    assert_eq!(names("!app").await, ["c"]);
    assert_eq!(names("app=clearml,tier!=core").await, ["a"]);
    assert_eq!(names("tier in (core,edge),!nope").await, ["a", "b"]);
    assert_eq!(names("app notin (clearml)").await, ["c", "d"]);
    assert_eq!(names("").await, ["a", "b", "c", "d"]);

    let page = api
        .list(&ListParams::default().limit(3))
        .await
        .expect("page 1");
    assert_eq!(page.items.len(), 3);
    let token = page.metadata.continue_.clone().expect("continue token");
    let rest = api
        .list(&ListParams::default().limit(3).continue_token(&token))
        .await
        .expect("page 2");
    let rest_names: Vec<_> = rest.items.iter().map(|n| n.name_any()).collect();
    assert_eq!(rest_names, ["d"]);
    assert_eq!(rest.metadata.continue_, None);
    assert_eq!(
        rest.metadata.resource_version,
        page.metadata.resource_version
    );

    // A paged initial list through the watcher.
    let mut watch = Watch::with(&fake, watcher::Config::default().page_size(1)).await;
    assert_eq!(watch.init().await, ["a", "b", "c", "d"]);
    assert_eq!(fake.list_requests(), 9 + 2 + 4);

    assert!(api.get("missing").await.is_err());
    let version = client(&fake)
        .await
        .apiserver_version()
        .await
        .expect("version");
    assert_eq!(version.minor, "33");
}

#[tokio::test]
async fn watch_timeout_ends_the_stream_and_the_watcher_rewatches() {
    let fake = FakeKube::start().await;
    fake.apply(node("a").internal_ip("10.0.0.1").build());
    let mut watch = Watch::with(&fake, watch_config().timeout(1)).await;
    assert_eq!(watch.init().await, ["a"]);
    // The server ends the first watch after timeoutSeconds=1; the watcher quietly re-watches.
    within("a re-watch", fake.wait_for_watch_requests(2)).await;
    assert_eq!(param(&watch_targets(&fake)[0], "timeoutSeconds"), "1");
    fake.apply(node("b").internal_ip("10.0.0.2").build());
    watch.apply("b").await;
    assert_eq!(fake.list_requests(), 1);
    assert!(watch.errors.is_empty(), "{:?}", watch.errors);
}

#[tokio::test]
async fn injected_errors_surface_as_api_errors() {
    let fake = FakeKube::start().await;
    fake.apply(node("a").build());
    let api = Api::<Node>::all(client(&fake).await);
    fake.fail_requests(Some(403));
    match api.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403),
        other => panic!("expected a 403, got {other:?}"),
    }
    fake.fail_requests(None);
    let list = api.list(&ListParams::default()).await.expect("list");
    assert_eq!(list.items.len(), 1);
}
