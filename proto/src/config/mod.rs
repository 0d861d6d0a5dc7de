//! The dataplane's configuration: the document ([`model`]), its validation
//! ([`validate`]) and loading from a file ([`load`]).

pub mod load;
pub mod model;
pub mod validate;

pub use load::LoadError;
pub use model::*;
pub use validate::{
    ConfigError, ConfigErrors, Object, Parsed, ParsedListener, ParsedMember, ParsedPool, Problem,
    Valid,
};
