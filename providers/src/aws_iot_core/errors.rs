//! AWS SDK errors classified into [`ProviderError`]: throttling with its retry-after, not
//! found, conflict, invalid input naming the field, unauthorized, and transient for the
//! rest (timeouts, connection failures, 5xx).
//!
//! Owns no I/O: [`classify`] reads an SDK error, [`classify_service`] is the pure mapping
//! of an AWS error code and HTTP status.

use std::error::Error as StdError;
use std::time::Duration;

use aws_sdk_iot::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::ProviderError;

/// Delay announced for a throttled call whose response carries no `Retry-After`.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// One AWS call, as error messages name it.
#[derive(Clone, Debug)]
pub struct Call<'a> {
    /// The API operation, e.g. `CreateThing`.
    pub op: &'static str,
    /// The resource it acted on, e.g. `thing pump-1`.
    pub resource: &'a str,
    /// The input field blamed for an invalid-input answer (`msdyn_deviceid`,
    /// `msdyn_tags`, `msdyn_message`, a config key...).
    pub field: &'static str,
}

/// What an AWS error response says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceFailure<'a> {
    /// The error code (`ThrottlingException`, `ResourceNotFoundException`...).
    pub code: &'a str,
    /// The error message.
    pub message: &'a str,
    /// The HTTP status.
    pub status: u16,
    /// The `Retry-After` header, if any.
    pub retry_after: Option<Duration>,
}

/// Classifies an SDK error of `call` on provider instance `instance`.
pub fn classify<E>(instance: &str, call: &Call<'_>, err: &SdkError<E>) -> ProviderError
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    let instance = instance.to_owned();
    let what = format!("{} of {}", call.op, call.resource);
    match err {
        SdkError::ServiceError(se) => {
            let raw = se.raw();
            let failure = ServiceFailure {
                code: err.code().unwrap_or_default(),
                message: err.message().unwrap_or_default(),
                status: raw.status().as_u16(),
                retry_after: raw.headers().get("retry-after").and_then(parse_retry_after),
            };
            classify_service(&instance, call, &failure)
        }
        SdkError::TimeoutError(_) => ProviderError::Transient {
            instance,
            message: format!("{what} timed out (api_timeout_ms): AWS IoT did not answer in time"),
        },
        other => {
            let detail = DisplayErrorContext(other).to_string();
            if mentions_credentials(&detail) {
                ProviderError::Unauthorized {
                    instance,
                    message: format!(
                        "{what}: no usable AWS credentials ({detail}): set access_key_id and secret_access_key, a profile, AWS_* variables or an instance role"
                    ),
                }
            } else if matches!(other, SdkError::ConstructionFailure(_)) {
                ProviderError::InvalidInput {
                    instance,
                    field: call.field.to_owned(),
                    message: format!("{what} could not be built: {detail}"),
                }
            } else {
                ProviderError::Transient {
                    instance,
                    message: format!("{what} failed: {detail}"),
                }
            }
        }
    }
}

fn mentions_credentials(detail: &str) -> bool {
    let d = detail.to_ascii_lowercase();
    d.contains("credential") || d.contains("no identity") || d.contains("identity resolver")
}

/// `Retry-After` in seconds (AWS sends delta-seconds, never a date).
fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

/// The class of an AWS error response: by its code first, then by its HTTP status.
pub fn classify_service(instance: &str, call: &Call<'_>, f: &ServiceFailure<'_>) -> ProviderError {
    let instance = instance.to_owned();
    let what = format!("{} of {}", call.op, call.resource);
    let detail = if f.message.is_empty() {
        f.code.to_owned()
    } else {
        format!("{}: {}", f.code, f.message)
    };
    match (f.code, f.status) {
        ("ThrottlingException" | "TooManyRequestsException" | "RequestLimitExceeded"
        | "SlowDown", _)
        | (_, 429) => ProviderError::Throttled {
            instance,
            retry_after: f.retry_after.unwrap_or(DEFAULT_RETRY_AFTER),
            message: format!("{what}: AWS IoT throttled the call ({detail})"),
        },
        ("ResourceNotFoundException" | "NotFoundException", _) | (_, 404) => {
            ProviderError::NotFound {
                instance,
                what: format!("{} ({detail})", call.resource),
            }
        }
        ("ResourceAlreadyExistsException" | "ConflictException" | "ConflictingResourceUpdateException"
        | "VersionConflictException" | "DeleteConflictException" | "CertificateStateException"
        | "InvalidStateTransitionException" | "VersionsLimitExceededException", _)
        | (_, 409) => ProviderError::Conflict {
            instance,
            message: format!("{what}: {detail}"),
        },
        ("UnauthorizedException" | "AccessDeniedException" | "ForbiddenException"
        | "InvalidClientTokenId" | "UnrecognizedClientException" | "ExpiredTokenException"
        | "SignatureDoesNotMatch" | "InvalidSignatureException" | "MissingAuthenticationToken", _)
        | (_, 401 | 403) => ProviderError::Unauthorized {
            instance,
            message: format!(
                "{what} refused ({detail}): check the credentials and that their IAM policy allows iot:{}",
                call.op
            ),
        },
        ("MethodNotAllowedException" | "UnsupportedDocumentEncodingException"
        | "NotImplementedException", _)
        | (_, 405 | 501) => ProviderError::Unsupported {
            instance,
            what: format!("{what} ({detail})"),
        },
        ("InvalidRequestException" | "ValidationException" | "MalformedPolicyException"
        | "RequestEntityTooLargeException" | "LimitExceededException"
        | "InvalidQueryException" | "CertificateValidationException", _) => {
            ProviderError::InvalidInput {
                instance,
                field: call.field.to_owned(),
                message: format!("{what}: {detail}"),
            }
        }
        (_, s) if (400..500).contains(&s) => ProviderError::InvalidInput {
            instance,
            field: call.field.to_owned(),
            message: format!("{what}: {detail}"),
        },
        _ => ProviderError::Transient {
            instance,
            message: format!("{what}: AWS IoT failed ({detail}, HTTP {})", f.status),
        },
    }
}

/// `err` with `note` appended to its message (e.g. what a rollback did).
pub fn with_note(err: ProviderError, note: &str) -> ProviderError {
    use ProviderError as E;
    let add = |m: String| format!("{m}; {note}");
    match err {
        E::Transient { instance, message } => E::Transient {
            instance,
            message: add(message),
        },
        E::Throttled {
            instance,
            retry_after,
            message,
        } => E::Throttled {
            instance,
            retry_after,
            message: add(message),
        },
        E::NotFound { instance, what } => E::NotFound {
            instance,
            what: add(what),
        },
        E::Conflict { instance, message } => E::Conflict {
            instance,
            message: add(message),
        },
        E::InvalidInput {
            instance,
            field,
            message,
        } => E::InvalidInput {
            instance,
            field,
            message: add(message),
        },
        E::Unauthorized { instance, message } => E::Unauthorized {
            instance,
            message: add(message),
        },
        E::Unsupported { instance, what } => E::Unsupported {
            instance,
            what: add(what),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(code: &str, status: u16) -> ProviderError {
        let call = Call {
            op: "CreateThing",
            resource: "thing pump-1",
            field: "msdyn_deviceid",
        };
        classify_service(
            "aws",
            &call,
            &ServiceFailure {
                code,
                message: "m",
                status,
                retry_after: None,
            },
        )
    }

    #[test]
    fn aws_error_codes_map_to_the_provider_error_classes() {
        let cases = [
            ("ThrottlingException", 400, "throttled"),
            ("", 429, "throttled"),
            ("ResourceNotFoundException", 404, "not_found"),
            ("ResourceAlreadyExistsException", 409, "conflict"),
            ("DeleteConflictException", 409, "conflict"),
            ("CertificateStateException", 406, "conflict"),
            ("InvalidRequestException", 400, "invalid_input"),
            ("UnauthorizedException", 401, "unauthorized"),
            ("AccessDeniedException", 403, "unauthorized"),
            ("InvalidClientTokenId", 403, "unauthorized"),
            ("ServiceUnavailableException", 503, "transient"),
            ("InternalFailureException", 500, "transient"),
            ("MethodNotAllowedException", 405, "unsupported"),
            ("SomethingNew", 418, "invalid_input"),
        ];
        for (code, status, want) in cases {
            assert_eq!(class(code, status).class(), want, "{code} {status}");
        }
    }

    #[test]
    fn throttling_carries_the_announced_retry_after_or_a_default() {
        let call = Call {
            op: "Publish",
            resource: "topic t",
            field: "msdyn_message",
        };
        let mut f = ServiceFailure {
            code: "ThrottlingException",
            message: "Rate exceeded",
            status: 429,
            retry_after: parse_retry_after("7"),
        };
        match classify_service("aws", &call, &f) {
            ProviderError::Throttled { retry_after, .. } => {
                assert_eq!(retry_after, Duration::from_secs(7))
            }
            other => panic!("{other}"),
        }
        f.retry_after = None;
        match classify_service("aws", &call, &f) {
            ProviderError::Throttled { retry_after, .. } => {
                assert_eq!(retry_after, DEFAULT_RETRY_AFTER)
            }
            other => panic!("{other}"),
        }
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn invalid_input_names_the_field_and_the_operation() {
        match class("InvalidRequestException", 400) {
            ProviderError::InvalidInput { field, message, .. } => {
                assert_eq!(field, "msdyn_deviceid");
                assert!(message.contains("CreateThing of thing pump-1"), "{message}");
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn a_note_is_appended_to_the_message_keeping_the_class() {
        let e = with_note(
            class("UnauthorizedException", 403),
            "rolled back: deleted thing pump-1",
        );
        assert_eq!(e.class(), "unauthorized");
        assert!(
            e.to_string().ends_with("rolled back: deleted thing pump-1"),
            "{e}"
        );
    }
}
