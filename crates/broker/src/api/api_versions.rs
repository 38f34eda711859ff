//! ApiVersions: the versions in [`super::SUPPORTED`], and the v0 fallback answer.

use protocol::kafka_protocol::messages::api_versions_response::ApiVersion;
use protocol::kafka_protocol::messages::{ApiVersionsRequest, ApiVersionsResponse};
use protocol::{ResponseError, ResponseKind};

use super::{code, SUPPORTED};

fn api_keys() -> Vec<ApiVersion> {
    SUPPORTED
        .iter()
        .map(|(key, min, max)| {
            ApiVersion::default()
                .with_api_key(*key as i16)
                .with_min_version(*min)
                .with_max_version(*max)
        })
        .collect()
}

/// KIP-511: a client software name/version must be non-empty and made of
/// alphanumerics, '.' and '-', starting and ending alphanumeric.
fn valid_software_field(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'.' || *b == b'-')
}

pub fn handle(request: &ApiVersionsRequest, version: i16) -> ApiVersionsResponse {
    let mut response = ApiVersionsResponse::default().with_api_keys(api_keys());
    if version >= 3
        && !(valid_software_field(&request.client_software_name)
            && valid_software_field(&request.client_software_version))
    {
        response.error_code = code(ResponseError::InvalidRequest);
    }
    response
}

/// The answer to an ApiVersions request at a version we do not serve, encoded as v0.
pub fn unsupported_version() -> ResponseKind {
    ApiVersionsResponse::default()
        .with_error_code(code(ResponseError::UnsupportedVersion))
        .with_api_keys(api_keys())
        .into()
}
