//! What an API key may do: the scopes, a leaf that both the key checks and the errors name.

use std::fmt;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `POST /tasks`.
    Submit,
    /// Status and listing endpoints.
    Read,
    /// Operator endpoints.
    Admin,
}

impl Scope {
    pub(crate) const ALL: [Self; 3] = [Self::Submit, Self::Read, Self::Admin];

    pub(crate) fn bit(self) -> u8 {
        match self {
            Self::Submit => 1,
            Self::Read => 2,
            Self::Admin => 4,
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|scope| scope.to_string() == text)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Submit => "submit",
            Self::Read => "read",
            Self::Admin => "admin",
        })
    }
}
