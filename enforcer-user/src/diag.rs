//! Problems found in user input, located by file, object and field.

use serde::Serialize;

/// An error makes the object it names invalid (it is skipped; everything else is applied). A
/// warning is reported and the object is used, as `istioctl validate` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One problem in an object or document, located by file, object and field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{file}: {object}: {field}: {message}")]
pub struct Problem {
    /// A file path, or another origin such as `kubernetes`.
    pub file: String,
    /// `ServiceEntry frontend/postgres-db`, or `document 2` when it has no usable name.
    pub object: String,
    /// A field path such as `spec.ports[0].number`, or `-` when the whole document is unreadable.
    pub field: String,
    pub message: String,
    pub severity: Severity,
}

impl Problem {
    pub fn new(
        file: impl Into<String>,
        object: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            file: file.into(),
            object: object.into(),
            field: field.into(),
            message: message.into(),
            severity: Severity::Error,
        }
    }

    pub fn warning(
        file: impl Into<String>,
        object: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::new(file, object, field, message)
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}
