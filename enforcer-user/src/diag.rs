//! Problems found in user input, located by file, object and field.

use serde::Serialize;

/// One invalid object or document. The object it names is skipped; everything else is applied.
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
        }
    }
}
