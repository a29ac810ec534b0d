//! One error type for a request's life and the one place that turns it into a response.
//!
//! Each variant records where the failure came from (client or upstream) and maps to exactly
//! one status; the body is a short plain-text line naming the cause. The status choices follow
//! what ClearML's SDK does with them: it retries 502 and 503 (503 forever), not 504.

use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};

use super::body::ResponseBody;
use crate::http1::{FramingError, HeadError};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request has no Host header")]
    MissingHost,
    #[error("request has more than one Host header")]
    DuplicateHost,
    #[error("no route for this host")]
    UnknownHost,
    #[error("host does not match the TLS server name of the connection")]
    Misdirected,
    #[error("{0}")]
    BadHead(#[from] crate::http1::HeadError),
    #[error("malformed request body: {0}")]
    BadBody(#[source] super::body::BoxError),
    #[error("request body exceeds the route's limit of {0} bytes")]
    BodyTooLarge(u64),
    #[error("no node list yet: discovery has not synced")]
    NotReady,
    #[error("route {route} has no node")]
    NoBackend { route: String },
    #[error("connect to {node} failed: {reason}")]
    ConnectFailed { node: String, reason: String },
    #[error("{node} did not answer within {secs}s")]
    UpstreamTimeout { node: String, secs: u64 },
    #[error("{node} failed: {source}")]
    UpstreamFailed {
        node: String,
        #[source]
        source: crate::upstream::ExchangeError,
    },
    #[error("{node} switched protocols without being asked")]
    UnexpectedUpgrade { node: String },
    #[error("client went away")]
    ClientGone,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        use ProxyError::*;
        match self {
            MissingHost | DuplicateHost | BadBody(_) | ClientGone => StatusCode::BAD_REQUEST,
            BadHead(e) => e.status(),
            UnknownHost => StatusCode::NOT_FOUND,
            Misdirected => StatusCode::MISDIRECTED_REQUEST,
            BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            NoBackend { .. } | NotReady => StatusCode::SERVICE_UNAVAILABLE,
            ConnectFailed { .. } | UpstreamFailed { .. } | UnexpectedUpgrade { .. } => {
                StatusCode::BAD_GATEWAY
            }
            UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// True when the client caused it (logged at debug rather than warn).
    pub fn is_client_fault(&self) -> bool {
        self.status().is_client_error()
    }

    fn body(&self) -> &'static str {
        use ProxyError::*;
        match self {
            MissingHost => "400 Bad Request: missing Host header\n",
            DuplicateHost => "400 Bad Request: more than one Host header\n",
            BadHead(e) => head_refusal(e),
            BadBody(_) => "400 Bad Request: malformed request body\n",
            ClientGone => "400 Bad Request: request body ended early\n",
            UnknownHost => "404 Not Found: no route for this host\n",
            Misdirected => "421 Misdirected Request: host does not match the TLS server name\n",
            BodyTooLarge(_) => "413 Payload Too Large: request body exceeds this route's limit\n",
            NoBackend { .. } => "503 Service Unavailable: no node available for this route\n",
            NotReady => "503 Service Unavailable: waiting for the first node list\n",
            ConnectFailed { .. } => "502 Bad Gateway: could not connect to a node\n",
            UpstreamFailed { .. } => "502 Bad Gateway: the node failed to answer\n",
            UnexpectedUpgrade { .. } => "502 Bad Gateway: the node switched protocols unasked\n",
            UpstreamTimeout { .. } => "504 Gateway Timeout: the node did not answer in time\n",
        }
    }

    pub fn into_response(self) -> Response<ResponseBody> {
        let mut response = Response::new(ResponseBody::text(self.body()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let ProxyError::NoBackend { .. } | ProxyError::NotReady = self {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("5"));
        }
        response
    }
}

/// The body of a refused request head: its cause, in the words of the field it is about.
fn head_refusal(error: &HeadError) -> &'static str {
    match error {
        HeadError::TooLarge | HeadError::TooManyFields => {
            "431 Request Header Fields Too Large: the request head is over the limit\n"
        }
        HeadError::Malformed(_) => "400 Bad Request: malformed request head\n",
        HeadError::Framing(framing) => match framing {
            FramingError::LengthAndCoding => {
                "400 Bad Request: both Content-Length and Transfer-Encoding\n"
            }
            FramingError::RepeatedLength | FramingError::BadLength => {
                "400 Bad Request: invalid Content-Length\n"
            }
            FramingError::NotChunked | FramingError::CodingInHttp10 => {
                "400 Bad Request: invalid Transfer-Encoding\n"
            }
            FramingError::UnsupportedCoding => {
                "501 Not Implemented: a transfer coding other than chunked\n"
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(ProxyError::MissingHost.status(), 400);
        assert_eq!(ProxyError::UnknownHost.status(), 404);
        assert_eq!(ProxyError::BodyTooLarge(1).status(), 413);
        let r = ProxyError::NoBackend {
            route: "api".into(),
        }
        .into_response();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[RETRY_AFTER], "5");
        let r = ProxyError::UpstreamTimeout {
            node: "n".into(),
            secs: 1,
        }
        .into_response();
        assert_eq!(r.status(), 504);
    }
}
