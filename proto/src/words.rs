//! Closed sets of words: each value of such an enum has exactly one
//! spelling (Octavia's), used by serde, by the controller's API checks and
//! by its error messages alike. A word outside the set, from a request or
//! from a stored document, is an error naming the set, never a default.

/// An enum whose values are words ([`words!`] implements it).
pub trait Word: Copy + Eq + 'static {
    /// Every value, in the order the API lists them.
    const ALL: &'static [Self];

    /// The value's one spelling.
    fn as_str(self) -> &'static str;

    /// The value spelled `s`, if any.
    fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|w| w.as_str() == s)
    }

    /// "A, B, C": for error messages.
    fn list() -> String {
        let all: Vec<&str> = Self::ALL.iter().map(|w| w.as_str()).collect();
        all.join(", ")
    }
}

/// Declares an enum of words: the serde spelling, [`Word::as_str`] and
/// [`Word::ALL`] come from one list, so they cannot disagree.
#[macro_export]
macro_rules! words {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ::serde::Serialize, ::serde::Deserialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $text)] $variant, )+
        }

        impl $name {
            /// The value's one spelling.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl $crate::words::Word for $name {
            const ALL: &'static [Self] = &[$(Self::$variant),+];

            fn as_str(self) -> &'static str {
                $name::as_str(self)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
