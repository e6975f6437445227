//! A response before it becomes an HTTP one, and the one place where an [`ApiError`]
//! becomes an HTTP status.

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde::Serialize;

use crate::ApiError;

/// `Content-Type` of JSON bodies.
pub const JSON: &str = "application/json";
/// `Content-Type` of `/metrics` (Prometheus text exposition format 0.0.4).
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A response, before it becomes an HTTP one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    /// The status.
    pub status: StatusCode,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: Bytes,
    /// `Allow`, on a 405.
    pub allow: Option<String>,
    /// What was wrong, for the log (the body says the same to the client).
    pub error: Option<String>,
}

impl ApiResponse {
    /// A JSON response.
    pub fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> ApiResponse {
        match serde_json::to_vec(value) {
            Ok(body) => ApiResponse {
                status,
                content_type: JSON,
                body: Bytes::from(body),
                allow: None,
                error: None,
            },
            Err(e) => ApiResponse::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode the response: {e}"),
            ),
        }
    }

    /// An empty answer (no `Content-Type`), e.g. 204 No Content.
    pub fn empty(status: StatusCode) -> ApiResponse {
        ApiResponse {
            status,
            content_type: "",
            body: Bytes::new(),
            allow: None,
            error: None,
        }
    }

    /// An error: `{"error": "..."}`.
    pub fn error(status: StatusCode, msg: impl Into<String>) -> ApiResponse {
        let msg = msg.into();
        let body = serde_json::json!({ "error": msg }).to_string();
        ApiResponse {
            status,
            content_type: JSON,
            body: Bytes::from(body),
            allow: None,
            error: Some(msg),
        }
    }

    /// The answer to a failed backend call: 400, 404 or 503 with `{"error": ...}`.
    pub fn from_api_error(e: ApiError) -> ApiResponse {
        let status = match e {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiResponse::error(status, e.to_string())
    }
}

/// 405 for `method` on the route `template`, with `Allow: methods`.
pub fn method_not_allowed(method: &Method, template: &str, methods: &[&str]) -> ApiResponse {
    let allow = methods.join(", ");
    let mut r = ApiResponse::error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {template}: use {allow}"),
    );
    r.allow = Some(allow);
    r
}
