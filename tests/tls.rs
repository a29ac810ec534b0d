//! HTTPS at the edge with certificates made in the test (rcgen): SNI selection, ALPN, reload,
//! 421 on SNI/Host mismatch, the HTTP→HTTPS redirect, HSTS, WebSocket over TLS, and the
//! certificate errors `check` reports.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use hyper::client::conn::http1;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::CertificateDer;
use support::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

const LIMIT: Duration = Duration::from_secs(30);

struct Pki {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "clearml-edge test CA");
        let key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        Pki {
            ca_der: ca.der().clone(),
            issuer: Issuer::new(params, key),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A leaf for `names`, written as `<file>.crt` / `<file>.key`; returns the paths and DER.
    fn leaf(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf, CertificateDer<'static>) {
        self.leaf_valid(file, names, false)
    }

    fn leaf_valid(
        &self,
        file: &str,
        names: &[&str],
        expired: bool,
    ) -> (PathBuf, PathBuf, CertificateDer<'static>) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let crt = self.dir.path().join(format!("{file}.crt"));
        let keyfile = self.dir.path().join(format!("{file}.key"));
        std::fs::write(&crt, cert.pem()).unwrap();
        std::fs::write(&keyfile, key.serialize_pem()).unwrap();
        (crt, keyfile, cert.der().clone())
    }

    fn connector(&self, alpn: &[&[u8]]) -> TlsConnector {
        self.connector_with(
            rustls::crypto::ring::default_provider(),
            rustls::DEFAULT_VERSIONS,
            alpn,
        )
    }

    /// A client trusting this CA, with the given cipher suites (provider) and versions.
    fn connector_with(
        &self,
        provider: rustls::crypto::CryptoProvider,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: &[&[u8]],
    ) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }

    async fn connect(&self, proxy: SocketAddr, sni: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(proxy).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from(sni.to_string()).unwrap();
        self.connector(alpn)
            .connect(name, tcp)
            .await
            .expect("TLS handshake")
    }
}

fn peer_leaf(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

fn tls_config(cluster: &Cluster, certs: &[(&Path, &Path)], extra: &str) -> String {
    let certs: String = certs
        .iter()
        .map(|(c, k)| format!("[[tls.certificates]]\ncert = {:?}\nkey = {:?}\n", c, k))
        .collect();
    format!(
        "domain = \"example.com\"\n[[listeners]]\naddress = \"127.0.0.1:0\"\ntls = true\n[[listeners]]\naddress = \"127.0.0.1:0\"\nplain_http = \"redirect\"\n[discovery.static]\nnodes = [\"127.0.0.1\"]\n{HEALTH}[tls]\nreload_interval = \"50ms\"\nhsts = \"max-age=31536000\"\n{certs}{}{extra}",
        cluster.routes()
    )
}

/// A proxy with one wildcard certificate for `*.example.com` on its TLS listener (the first;
/// the second redirects plain HTTP), in front of `cluster`.
async fn wildcard_proxy(pki: &Pki, cluster: &Cluster, extra: &str) -> clearml_edge::RunningServer {
    let (crt, key, _) = pki.leaf("wildcard", &["*.example.com"]);
    proxy(&tls_config(cluster, &[(&crt, &key)], extra)).await
}

/// An HTTP/1.1 client connection over an established TLS stream.
async fn h1_sender(stream: TlsStream<TcpStream>) -> http1::SendRequest<Body> {
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    sender
}

/// One HTTP/1.1 GET over an established TLS stream.
async fn h1_get(
    stream: TlsStream<TcpStream>,
    host: &str,
    path: &str,
) -> (StatusCode, hyper::HeaderMap, String) {
    get_on(&mut h1_sender(stream).await, host, path).await
}

/// One GET on an HTTP/1.1 client connection: status, headers and body.
async fn get_on(
    sender: &mut http1::SendRequest<Body>,
    host: &str,
    path: &str,
) -> (StatusCode, hyper::HeaderMap, String) {
    let req = Request::builder()
        .uri(path)
        .header("host", host)
        .body(full(""))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn https_per_route_with_sni_selecting_the_certificate() {
    let pki = Pki::new();
    let (wc_crt, wc_key, wildcard) = pki.leaf("wildcard", &["*.example.com"]);
    let (f_crt, f_key, files_cert) = pki.leaf("files", &["files.example.com"]);
    let cluster = Cluster::echo().await;
    let proxy = proxy(&tls_config(
        &cluster,
        &[(&wc_crt, &wc_key), (&f_crt, &f_key)],
        "",
    ))
    .await;
    let https = proxy.local_addrs()[0];
    for (name, expected) in [
        ("app", &wildcard),
        ("api", &wildcard),
        ("files", &files_cert),
    ] {
        let host = format!("{name}.example.com");
        let stream = pki.connect(https, &host, &[b"http/1.1"]).await;
        assert_eq!(&peer_leaf(&stream), expected, "{host}");
        let (status, headers, body) = h1_get(stream, &host, "/x").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, name);
        assert_eq!(headers["strict-transport-security"], "max-age=31536000");
    }
    assert_eq!(cluster.api.last().headers["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn alpn_gives_http2_or_http1_as_asked() {
    let pki = Pki::new();
    let cluster = Cluster::echo().await;
    let proxy = wildcard_proxy(&pki, &cluster, "").await;
    let https = proxy.local_addrs()[0];

    let stream = pki
        .connect(https, "api.example.com", &[b"h2", b"http/1.1"])
        .await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let req = Request::builder()
            .uri("https://api.example.com/h2")
            .body(full(""))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
    }

    let stream = pki.connect(https, "api.example.com", &[b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (status, _, body) = h1_get(stream, "api.example.com", "/").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "api"));
}

#[tokio::test]
async fn a_replaced_certificate_is_picked_up_and_a_broken_one_refused() {
    let pki = Pki::new();
    let (crt, key, first) = pki.leaf("live", &["*.example.com"]);
    let cluster = Cluster::echo().await;
    let proxy = proxy(&tls_config(&cluster, &[(&crt, &key)], "")).await;
    let https = proxy.local_addrs()[0];
    let tls = proxy.tls().expect("TLS configured").clone();

    // An open connection made with the first certificate.
    let open = pki.connect(https, "app.example.com", &[b"http/1.1"]).await;
    assert_eq!(peer_leaf(&open), first);
    let (mut open_sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(open))
        .await
        .unwrap();
    tokio::spawn(conn);

    // Renewal: new files written (as a Secret update would), the next handshake sees them.
    let (_, _, second) = pki.leaf("live", &["*.example.com"]);
    tokio::time::timeout(LIMIT, async {
        loop {
            let stream = pki.connect(https, "app.example.com", &[b"http/1.1"]).await;
            if peer_leaf(&stream) == second {
                return;
            }
            let checks = tls.checks();
            while tls.checks() == checks {
                tokio::task::yield_now().await;
            }
        }
    })
    .await
    .expect("the renewed certificate is served");

    // The connection opened before still works.
    let req = Request::builder()
        .uri("/still")
        .header("host", "app.example.com")
        .body(full(""))
        .unwrap();
    assert_eq!(
        open_sender.send_request(req).await.unwrap().status(),
        StatusCode::OK
    );

    // A broken replacement is refused; the renewed certificate keeps serving.
    std::fs::write(
        &crt,
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let checks = tls.checks();
    tokio::time::timeout(LIMIT, async {
        while tls.checks() < checks + 2 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the files were checked again");
    let stream = pki.connect(https, "app.example.com", &[b"http/1.1"]).await;
    assert_eq!(peer_leaf(&stream), second);
}

#[tokio::test]
async fn host_not_matching_sni_is_421() {
    let pki = Pki::new();
    let cluster = Cluster::echo().await;
    let proxy = wildcard_proxy(&pki, &cluster, "").await;
    let stream = pki
        .connect(proxy.local_addrs()[0], "app.example.com", &[b"http/1.1"])
        .await;
    let (status, _, body) = h1_get(stream, "files.example.com", "/secret").await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
    assert!(body.starts_with("421"));
    assert!(cluster.files.seen().is_empty());
}

#[tokio::test]
async fn plain_http_redirects_to_https_with_308() {
    let pki = Pki::new();
    let cluster = Cluster::echo().await;
    let proxy = wildcard_proxy(&pki, &cluster, "").await;
    let plain = proxy.local_addrs()[1];
    let answer = raw(
        plain,
        b"POST /upload/a%20b?x=1 HTTP/1.1\r\nHost: Files.Example.com:80\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    .await;
    assert_eq!(status_of(&answer), 308, "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("location: https://files.example.com/upload/a%20b?x=1\r\n"),
        "{answer}"
    );
    assert!(cluster.files.seen().is_empty());
    // Unknown hosts are not redirected.
    assert_eq!(
        status_of(
            &raw(
                plain,
                b"GET / HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n"
            )
            .await
        ),
        404
    );
}

#[tokio::test]
async fn websocket_over_tls() {
    let pki = Pki::new();
    let (crt, key, _) = pki.leaf("wildcard", &["*.example.com"]);
    let port = websocket_echo().await;
    let cluster = Cluster::echo().await;
    let text = tls_config(&cluster, &[(&crt, &key)], "").replace(
        &format!("[routes.app]\nport = {}\n", cluster.app.port()),
        &format!("[routes.app]\nport = {port}\n"),
    );
    let proxy = proxy(&text).await;
    let stream = pki
        .connect(proxy.local_addrs()[0], "app.example.com", &[b"http/1.1"])
        .await;
    let (mut ws, response) = tokio_tungstenite::client_async("wss://app.example.com/ws", stream)
        .await
        .expect("websocket handshake over TLS");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(tokio_tungstenite::tungstenite::Message::text("over tls"))
        .await
        .unwrap();
    let echoed = ws.next().await.unwrap().unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "over tls");
}

#[tokio::test]
async fn certificate_problems_are_config_errors_naming_file_and_fix() {
    let pki = Pki::new();
    let cluster = Cluster::echo().await;
    let (crt, key, _) = pki.leaf("wildcard", &["*.example.com"]);
    let (_, other_key, _) = pki.leaf("other", &["*.example.com"]);
    let (old_crt, old_key, _) = pki.leaf_valid("expired", &["*.example.com"], true);
    let (narrow_crt, narrow_key, _) = pki.leaf("narrow", &["app.example.com"]);
    let missing = pki.dir.path().join("missing.crt");
    let parse = |text: String| {
        clearml_edge::Config::parse(Path::new("edge.toml"), &text).expect_err("must be refused")
    };

    let e = parse(tls_config(&cluster, &[(&missing, &key)], ""));
    assert_eq!(e.key, "tls.certificates[0].cert");
    assert!(e.problem.contains("missing.crt"), "{e}");

    let e = parse(tls_config(&cluster, &[(&crt, &other_key)], ""));
    assert_eq!(e.key, "tls.certificates[0].key");
    assert!(e.problem.contains("does not match"), "{e}");

    let e = parse(tls_config(&cluster, &[(&old_crt, &old_key)], ""));
    assert!(e.problem.contains("expired"), "{e}");
    assert!(e.fix.contains("renew"), "{e}");

    let e = parse(tls_config(&cluster, &[(&narrow_crt, &narrow_key)], ""));
    assert_eq!(e.key, "tls.certificates");
    assert!(e.problem.contains("files.example.com"), "{e}");
}

/// The edge picks AES-128-GCM even when the client lists AES-256-GCM-SHA384 first (as
/// rustls and OpenSSL clients do): cheaper handshakes and records. A client that offers only
/// AES-256 still gets it.
#[tokio::test]
async fn server_prefers_aes128_and_still_speaks_aes256() {
    let pki = Pki::new();
    let cluster = Cluster::echo().await;
    let proxy = wildcard_proxy(&pki, &cluster, "").await;
    let https = proxy.local_addrs()[0];

    let stream = pki.connect(https, "api.example.com", &[b"http/1.1"]).await;
    let suite = stream.get_ref().1.negotiated_cipher_suite().unwrap();
    assert_eq!(suite.suite(), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);

    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .retain(|s| s.suite() == rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
    let tcp = TcpStream::connect(https).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("api.example.com").unwrap();
    let stream = pki
        .connector_with(provider, &[&rustls::version::TLS13], &[])
        .connect(name, tcp)
        .await
        .expect("AES-256-only handshake");
    let suite = stream.get_ref().1.negotiated_cipher_suite().unwrap();
    assert_eq!(suite.suite(), rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
    let (status, _, body) = h1_get(stream, "api.example.com", "/").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "api"));
}

/// A TLS client that completed its handshake but sent no request does not hold up a
/// shutdown, though the header timeout and the drain are a minute.
#[tokio::test]
async fn shutdown_closes_a_tls_connection_that_sent_nothing() {
    let pki = Pki::new();
    let cluster = Cluster::echo().await;
    let proxy = wildcard_proxy(
        &pki,
        &cluster,
        "[timeouts]\nclient_header = \"60s\"\nshutdown_drain = \"60s\"\n",
    )
    .await;
    let https = proxy.local_addrs()[0];
    let mut stream = pki.connect(https, "api.example.com", &[b"http/1.1"]).await;
    let done = tokio::time::timeout(std::time::Duration::from_secs(30), proxy.shutdown()).await;
    assert!(
        done.is_ok(),
        "shutdown waited for a TLS connection with nothing in flight"
    );
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
}

/// An idle TLS keep-alive connection is parked like a plain one (waiting on the socket once
/// rustls has no plaintext left) and serves its next request after.
#[tokio::test]
async fn an_idle_tls_connection_parks_and_serves_its_next_request() {
    let pki = Pki::new();
    let cluster = Cluster::echo().await;
    let proxy = wildcard_proxy(&pki, &cluster, "[admin]\naddress = \"127.0.0.1:0\"\n").await;
    let stream = pki
        .connect(proxy.local_addrs()[0], "api.example.com", &[b"http/1.1"])
        .await;
    let mut sender = h1_sender(stream).await;
    for round in 0..2 {
        let (status, _, body) = get_on(&mut sender, "api.example.com", &format!("/{round}")).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "api"));
        until_parked(&proxy, 1.0).await;
    }
    let targets: Vec<String> = cluster.api.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/0", "/1"]);
}

/// A large answer over a TLS keep-alive connection arrives whole at once (the proxy flushes
/// what TLS holds back when the socket is full), and the connection serves the next request.
#[tokio::test]
async fn a_large_download_over_tls_keep_alive_arrives_whole() {
    let pki = Pki::new();
    let cluster = Cluster {
        app: Upstream::echo("127.0.0.1:0", "app").await,
        files: Upstream::start("127.0.0.1:0", |_| async {
            hyper::Response::new(full(vec![b'x'; 8 << 20]))
        })
        .await,
        api: Upstream::echo("127.0.0.1:0", "api").await,
    };
    // Far beyond the test's bound: a response held back would wait for it.
    let proxy = wildcard_proxy(&pki, &cluster, "[timeouts]\nclient_header = \"300s\"\n").await;
    // A small receive window, so the proxy's writes keep meeting a full socket.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(proxy.local_addrs()[0]).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("files.example.com").unwrap();
    let stream = pki
        .connector(&[b"http/1.1"])
        .connect(name, tcp)
        .await
        .unwrap();
    let mut sender = h1_sender(stream).await;
    for _ in 0..3 {
        let (status, _, body) =
            tokio::time::timeout(LIMIT, get_on(&mut sender, "files.example.com", "/big"))
                .await
                .expect("the answer arrived whole");
        assert_eq!((status, body.len()), (StatusCode::OK, 8 << 20));
    }
}
