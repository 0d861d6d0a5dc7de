//! Errors in Octavia's body: `{"faultcode", "faultstring", "debuginfo"}`
//! (WSME's shape, which openstacksdk and the CLI read `faultstring` from).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::decide::spares::NoSpare;
use crate::store::StoreError;
use crate::vip::VipError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub status: StatusCode,
    pub message: String,
}

impl Fault {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Fault {
        Fault {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Fault {
        Fault::new(StatusCode::BAD_REQUEST, message)
    }

    /// Octavia's wording for a field that fails its check.
    pub fn invalid(field: &str, value: impl std::fmt::Display, why: &str) -> Fault {
        Fault::bad_request(format!(
            "Invalid input for field/attribute {field}. Value: '{value}'. {why}"
        ))
    }

    pub fn not_found(what: &str, id: &str) -> Fault {
        Fault::new(
            StatusCode::NOT_FOUND,
            format!("{what} {id} could not be found."),
        )
    }

    /// 409: the object (or its load balancer) is mid-change.
    pub fn immutable(what: &str, id: &str) -> Fault {
        Fault::new(
            StatusCode::CONFLICT,
            format!("{what} {id} is immutable and cannot be updated."),
        )
    }

    pub fn conflict(message: impl Into<String>) -> Fault {
        Fault::new(StatusCode::CONFLICT, message)
    }

    /// 501: a valid Octavia option this L4 provider does not implement.
    pub fn unsupported(option: impl std::fmt::Display) -> Fault {
        Fault::new(
            StatusCode::NOT_IMPLEMENTED,
            format!("Provider 'siphon' does not support a requested option: {option}"),
        )
    }

    /// 501: a whole kind of object or action this provider does not
    /// have (Octavia's `ProviderNotImplementedError`).
    pub fn not_implemented(action: impl std::fmt::Display) -> Fault {
        Fault::new(
            StatusCode::NOT_IMPLEMENTED,
            format!("Provider 'siphon' does not support a requested action: {action}"),
        )
    }

    pub fn unauthorized() -> Fault {
        Fault::new(
            StatusCode::UNAUTHORIZED,
            "Authentication required: send a valid X-Auth-Token header.",
        )
    }

    pub fn internal(message: impl Into<String>) -> Fault {
        Fault::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl From<StoreError> for Fault {
    fn from(e: StoreError) -> Fault {
        tracing::error!(error = %e, "store write failed; nothing changed");
        if e.is_unavailable() {
            // Nothing was written: the client may retry, here or at
            // another controller.
            return Fault::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("The database is unavailable; nothing was changed, retry later: {e}"),
            );
        }
        Fault::internal(format!("The change was not stored: {e}"))
    }
}

/// Octavia's fault for each reason a VIP cannot be given (same words).
impl From<VipError> for Fault {
    fn from(e: VipError) -> Fault {
        match &e {
            VipError::NotAnAddress(a) => {
                Fault::invalid("vip_address", a, "Value should be IPv4 or IPv6 format")
            }
            VipError::NotAHost { address, .. } => {
                Fault::invalid("vip_address", address, &e.to_string())
            }
            VipError::Taken { .. } | VipError::Exhausted(_) => Fault::conflict(e.to_string()),
            VipError::NoSuchSubnet(_)
            | VipError::NoSuchNetwork(_)
            | VipError::NoSubnetHolds { .. }
            | VipError::NoneGiven
            | VipError::OutsideSubnet { .. } => Fault::bad_request(e.to_string()),
        }
    }
}

/// 503: a load balancer needs more amphorae than are spare.
impl From<NoSpare> for Fault {
    fn from(e: NoSpare) -> Fault {
        Fault::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

impl IntoResponse for Fault {
    fn into_response(self) -> Response {
        let faultcode =
            if self.status.is_server_error() && self.status != StatusCode::NOT_IMPLEMENTED {
                "Server"
            } else {
                "Client"
            };
        (
            self.status,
            Json(json!({
                "faultcode": faultcode,
                "faultstring": self.message,
                "debuginfo": null,
            })),
        )
            .into_response()
    }
}
