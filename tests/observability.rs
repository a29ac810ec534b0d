//! Metrics and the access log after known traffic through the real proxy.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::{Method, StatusCode};
use support::*;

const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn counters_move_by_exactly_what_was_sent() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "[admin]\naddress = \"127.0.0.1:0\"\n").await;
    for _ in 0..3 {
        let (status, _, _) = get(addr(&proxy), "app.example.com", "/").await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, _, _) = send(
        &client(),
        addr(&proxy),
        Method::POST,
        "api.example.com",
        "/tasks.create",
        full(vec![b'j'; 1000]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = get(addr(&proxy), "files.example.com", "/../nothing").await;
    assert_eq!(status, StatusCode::OK);

    // Records complete when the response body is dropped, just after the client has it.
    let text = tokio::time::timeout(LIMIT, async {
        loop {
            let text = scrape(&proxy).await;
            let done = value(
                &text,
                "clearml_edge_request_duration_seconds_count{route=\"files\"}",
            ) == Some(1.0)
                && value(
                    &text,
                    "clearml_edge_request_duration_seconds_count{route=\"app\"}",
                ) == Some(3.0)
                && value(
                    &text,
                    "clearml_edge_request_duration_seconds_count{route=\"api\"}",
                ) == Some(1.0);
            if done {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("metrics caught up");

    let expect = [
        (
            "clearml_edge_requests_total{route=\"app\",class=\"2xx\"}",
            3.0,
        ),
        (
            "clearml_edge_requests_total{route=\"api\",class=\"2xx\"}",
            1.0,
        ),
        (
            "clearml_edge_requests_total{route=\"app\",class=\"5xx\"}",
            0.0,
        ),
        ("clearml_edge_response_bytes_total{route=\"app\"}", 9.0),
        ("clearml_edge_response_bytes_total{route=\"api\"}", 3.0),
        ("clearml_edge_request_bytes_total{route=\"api\"}", 1000.0),
        ("clearml_edge_request_bytes_total{route=\"app\"}", 0.0),
        ("clearml_edge_healthy_nodes{route=\"api\"}", 1.0),
        ("clearml_edge_nodes{route=\"api\"}", 1.0),
        ("clearml_edge_discovery_stale", 0.0),
    ];
    for (series, wanted) in expect {
        assert_eq!(value(&text, series), Some(wanted), "{series}\n{text}");
    }
    assert!(text.contains("# TYPE clearml_edge_request_duration_seconds histogram"));
    assert!(value(&text, "clearml_edge_open_connections").is_some());
}

#[tokio::test]
async fn failures_and_retries_are_counted_by_node() {
    let port = closed_port().await;
    let proxy = proxy(&config(
        &format!("[routes.api]\nport = {port}\n"),
        &["127.0.0.1", "127.0.0.2"],
        "[admin]\naddress = \"127.0.0.1:0\"\n",
    ))
    .await;
    let (status, _, _) = get(addr(&proxy), "api.example.com", "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let text = tokio::time::timeout(LIMIT, async {
        loop {
            let text = scrape(&proxy).await;
            if value(
                &text,
                "clearml_edge_requests_total{route=\"api\",class=\"5xx\"}",
            ) == Some(1.0)
            {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("metrics caught up");
    let errors: f64 = text
        .lines()
        .filter(|l| l.starts_with("clearml_edge_upstream_connect_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(errors, 2.0, "{text}");
    let retries: f64 = text
        .lines()
        .filter(|l| l.starts_with("clearml_edge_upstream_retries_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(retries, 1.0, "{text}");
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn an_access_log_line_carries_the_request() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_env_filter("access=info")
        .with_ansi(false)
        .finish();
    // The test runtime is single-threaded, so the proxy's tasks log on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);

    let cluster = Cluster::echo().await;
    let proxy = proxy_for(
        &cluster,
        "[access_log]\nenabled = true\nformat = \"json\"\n",
    )
    .await;
    let answer = raw(
        addr(&proxy),
        b"GET /v2.30/tasks.get_all?x=1 HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 200);
    let line = tokio::time::timeout(LIMIT, async {
        loop {
            let text = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
            if let Some(line) = text.lines().find(|l| l.contains("tasks.get_all")) {
                return line.to_string();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("an access log line");
    let json: serde_json::Value =
        serde_json::from_str(&line[line.find('{').expect("JSON in the line")..]).expect("JSON");
    assert_eq!(
        json["client"].as_str().unwrap().split(':').next(),
        Some("127.0.0.1")
    );
    assert_eq!(json["host"], "api.example.com");
    assert_eq!(json["method"], "GET");
    assert_eq!(json["path"], "/v2.30/tasks.get_all?x=1");
    assert_eq!(json["status"], 200);
    assert_eq!(json["bytes"], 3);
    assert_eq!(json["route"], "api");
    assert_eq!(
        json["upstream"],
        format!("127.0.0.1:{}", cluster.api.port())
    );
    assert_eq!(json["retries"], 0);
    assert!(json["duration_ms"].as_f64().unwrap() >= 0.0);
}
