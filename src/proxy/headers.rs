//! Header rewriting at the hop: hop-by-hop removal (RFC 9110 §7.6.1) in both directions and
//! the forwarding headers on the way in. Everything else passes untouched, in order, with
//! repeated fields (several `Set-Cookie`) kept as they are.

use hyper::header::{
    Entry, HeaderMap, HeaderName, HeaderValue, CONNECTION, TE, TRANSFER_ENCODING, UPGRADE,
};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// True when the `Connection` header carries the `upgrade` token and `Upgrade` is present.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// True when the `Connection` header carries the `close` token: the client will send nothing
/// more on this connection.
pub fn asks_to_close(headers: &HeaderMap) -> bool {
    connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("close"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes the hop-by-hop fields: the fixed set and every field `Connection` names. With
/// `keep_upgrade`, `Upgrade` survives and `Connection: upgrade` is set again, so a WebSocket
/// handshake reaches the other side intact.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names finds which of the fixed fields are there, so only those are
    // looked up to be removed: a typical head carries none, or only `Connection`.
    let mut present = [false; HOP_BY_HOP.len()];
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present[i] = true;
        }
    }
    let names_more = |value: &HeaderValue| {
        !USUAL_CONNECTION_TOKENS
            .iter()
            .any(|usual| value.as_bytes().eq_ignore_ascii_case(usual.as_bytes()))
    };
    if present[CONNECTION_INDEX] && headers.get_all(CONNECTION).iter().any(names_more) {
        // Only fields beyond the usual tokens need a name built; most heads have none.
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter(|t| {
                !USUAL_CONNECTION_TOKENS
                    .iter()
                    .any(|k| t.eq_ignore_ascii_case(k))
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            if !(keep_upgrade && name == UPGRADE) {
                headers.remove(&name);
            }
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, there)| *there) {
        if !(keep_upgrade && name == UPGRADE) {
            headers.remove(name);
        }
    }
    if keep_upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// `Connection` tokens that name no field to remove.
const USUAL_CONNECTION_TOKENS: [&str; 3] = ["keep-alive", "close", "upgrade"];

/// The fixed hop-by-hop fields (RFC 9110 §7.6.1, plus the legacy `Keep-Alive` and
/// `Proxy-Connection`).
static HOP_BY_HOP: [HeaderName; 6] = [
    CONNECTION,
    TRANSFER_ENCODING,
    UPGRADE,
    TE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];
const CONNECTION_INDEX: usize = 0;

/// Where `name` is in [`HOP_BY_HOP`]: a match on the text (length first) is cheaper than
/// comparing against each name in turn.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    match name.as_str() {
        "connection" => Some(0),
        "transfer-encoding" => Some(1),
        "upgrade" => Some(2),
        "te" => Some(3),
        "keep-alive" => Some(4),
        "proxy-connection" => Some(5),
        _ => None,
    }
}

/// Sets the forwarding fields: appends the client to `X-Forwarded-For`; sets `X-Real-IP`,
/// `X-Forwarded-Proto` and `X-Forwarded-Host` (the edge is the first hop, so what a client
/// sent in those is not trusted).
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client_ip: &HeaderValue,
    proto: &'static str,
    host: HeaderValue,
) {
    // Room for the four fields at once: one growth of the map at most, not one per field.
    headers.reserve(4);
    // One lookup serves both reading what came before and setting the new list.
    match headers.entry(&X_FORWARDED_FOR) {
        Entry::Vacant(entry) => {
            entry.insert(client_ip.clone());
        }
        Entry::Occupied(mut entry) => {
            let mut joined: Vec<u8> = Vec::with_capacity(64);
            for value in entry.iter() {
                joined.extend_from_slice(value.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(client_ip.as_bytes());
            entry.insert(HeaderValue::from_bytes(&joined).unwrap_or_else(|_| client_ip.clone()));
        }
    }
    headers.insert(&X_REAL_IP, client_ip.clone());
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    headers.insert(&X_FORWARDED_HOST, host);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn hop_by_hop_goes_end_to_end_stays() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("content-encoding", "gzip"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["set-cookie", "content-encoding"]);
        assert_eq!(h.get_all("set-cookie").iter().count(), 2);
    }

    #[test]
    fn a_head_without_hop_by_hop_fields_is_left_as_it_is() {
        let pairs = [
            ("content-type", "text/plain"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
        ];
        let mut h = map(&pairs);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, map(&pairs));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h.len(), 4);
    }

    #[test]
    fn fields_named_by_any_connection_line_go_and_upgrade_can_stay() {
        let mut h = map(&[
            ("connection", "close"),
            ("connection", "X-Hop"),
            ("x-hop", "1"),
            ("x-end", "2"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-end"]);

        let mut h = map(&[
            ("connection", "Upgrade, X-Hop"),
            ("upgrade", "websocket"),
            ("x-hop", "1"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert!(h.get("x-hop").is_none());
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn the_index_and_the_list_agree() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
        }
        assert_eq!(HOP_BY_HOP[CONNECTION_INDEX], CONNECTION);
        assert_eq!(hop_by_hop_index(&HeaderName::from_static("x-te")), None);
    }

    #[test]
    fn upgrade_kept_when_asked() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn forwarded_for_appends() {
        let ip = HeaderValue::from_static("10.1.2.3");
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
        ]);
        add_forwarded(&mut h, &ip, "https", HeaderValue::from_static("api.x"));
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.1.2.3");
        assert_eq!(h["x-real-ip"], "10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "api.x");
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, &ip, "http", HeaderValue::from_static("api.x"));
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
    }
}
