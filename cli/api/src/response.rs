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
            Err(e) => ApiResponse::from_api_error(ApiError::Internal(format!(
                "cannot encode the response: {e}"
            ))),
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

    /// An error: `{"error": "..."}` with `status`. The APIs of this crate never call it
    /// directly: their errors are [`ApiError`]s, answered by [`ApiResponse::from_api_error`].
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

    /// The answer to a failed request, `{"error": ...}`: the one place where the kind of
    /// an error becomes an HTTP status (see the table in the crate docs).
    pub fn from_api_error(e: ApiError) -> ApiResponse {
        let status = status_of(&e);
        let allow = match &e {
            ApiError::MethodNotAllowed { allow, .. } => Some(allow.clone()),
            _ => None,
        };
        let mut r = ApiResponse::error(status, e.to_string());
        r.allow = allow;
        r
    }
}

/// The HTTP status of an error kind.
pub fn status_of(e: &ApiError) -> StatusCode {
    match e {
        ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ApiError::NotFound(_) => StatusCode::NOT_FOUND,
        ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
        ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
        ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
        ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// 405 for `method` on the route `template`, with `Allow: methods`.
pub fn method_not_allowed(method: &Method, template: &str, methods: &[&str]) -> ApiError {
    let allow = methods.join(", ");
    ApiError::MethodNotAllowed {
        msg: format!("method {method} is not allowed on {template}: use {allow}"),
        allow,
    }
}
