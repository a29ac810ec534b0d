//! Host routing: normalising a request's host and finding its route, without allocating.
//!
//! The table is built once per configuration and only read on the request path. A ClearML
//! edge has a handful of host names (three routes, a few aliases), so a linear scan that
//! compares lengths first and bytes case-insensitively beats hashing, which would first
//! have to lower-case the host into a buffer.

use crate::config::Route;

/// Index of a route in the table (and in the snapshot's backend pools).
pub type RouteId = usize;

#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// (lower-case host, route) pairs.
    hosts: Vec<(Box<[u8]>, RouteId)>,
}

impl RouteTable {
    pub fn new(routes: Vec<Route>) -> Self {
        let hosts = routes
            .iter()
            .enumerate()
            .flat_map(|(id, r)| {
                r.hosts
                    .iter()
                    .map(move |h| (h.as_bytes().to_ascii_lowercase().into_boxed_slice(), id))
            })
            .collect();
        RouteTable { routes, hosts }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn route(&self, id: RouteId) -> &Route {
        &self.routes[id]
    }

    /// Finds the route for a raw `Host` / `:authority` value: case-insensitive, with any
    /// port and one trailing dot ignored.
    #[inline]
    pub fn lookup(&self, raw_host: &str) -> Option<RouteId> {
        let host = normalize_host(raw_host).as_bytes();
        self.hosts
            .iter()
            .find(|(h, _)| h.len() == host.len() && h.eq_ignore_ascii_case(host))
            .map(|(_, id)| *id)
    }
}

/// Strips the port and a trailing dot from a host, keeping IPv6 literals whole. Borrows.
#[inline]
pub fn normalize_host(raw: &str) -> &str {
    let host = if raw.starts_with('[') {
        // IPv6 literal: keep up to and including the closing bracket.
        match raw.find(']') {
            Some(end) => &raw[..=end],
            None => raw,
        }
    } else {
        match raw.rfind(':') {
            Some(colon) => &raw[..colon],
            None => raw,
        }
    };
    host.strip_suffix('.').unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        let route = |name: &str, hosts: &[&str], port| Route {
            name: name.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            port,
            max_body_bytes: None,
            health: Default::default(),
        };
        RouteTable::new(vec![
            route("app", &["app.example.com"], 30080),
            route("files", &["files.example.com", "dl.example.org"], 30081),
            route("api", &["api.example.com"], 30008),
        ])
    }

    #[test]
    fn variants_match() {
        let t = table();
        for host in [
            "api.example.com",
            "API.Example.COM",
            "api.example.com:8443",
            "api.example.com.",
            "API.EXAMPLE.COM.:443",
        ] {
            assert_eq!(t.lookup(host), Some(2), "{host}");
        }
        assert_eq!(t.lookup("DL.example.org"), Some(1));
        assert_eq!(t.lookup("app.example.com"), Some(0));
    }

    #[test]
    fn others_do_not() {
        let t = table();
        for host in [
            "",
            "foo.example.com",
            "api.example.co",
            "xapi.example.com",
            "api.example.com..",
            "[::1]:80",
            "api",
        ] {
            assert_eq!(t.lookup(host), None, "{host}");
        }
    }

    #[test]
    fn normalisation() {
        assert_eq!(normalize_host("[::1]:8080"), "[::1]");
        assert_eq!(normalize_host("a.b.:1"), "a.b");
        assert_eq!(normalize_host("a.b"), "a.b");
    }
}
