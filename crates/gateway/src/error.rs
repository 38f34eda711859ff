//! The one error body every route answers with, in the REST Proxy's form:
//! `{"error_code": 42201, "message": "..."}` (the code is the HTTP status times 100
//! plus a detail), with `violations` added for schema failures.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::schema::Violation;

#[derive(Debug, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    pub error_code: u32,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub violations: Option<Vec<Violation>>,
    /// Where a refused pipeline file is wrong (1-based line and column).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, detail: u32, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error_code: status.as_u16() as u32 * 100 + detail,
            message: message.into(),
            violations: None,
            line: None,
            column: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, 0, message)
    }

    /// 40401, as the REST Proxy answers for a missing topic.
    pub fn topic_not_found(topic: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            1,
            format!("Topic '{topic}' not found."),
        )
    }

    /// 40402, as the REST Proxy answers for a missing partition.
    pub fn partition_not_found(topic: &str, partition: i32) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            2,
            format!("Partition {partition} of topic '{topic}' not found."),
        )
    }

    pub fn not_found(detail: u32, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, detail, message)
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, 0, message)
    }

    pub fn unprocessable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, 0, message)
    }

    /// `503` with `Retry-After`: the client should come back.
    pub fn busy(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, 0, message)
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, 0, message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.error_code)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        let mut response = (status, Json(&self)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
