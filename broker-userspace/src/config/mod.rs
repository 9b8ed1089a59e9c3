//! Configuration: YAML (Secretless v2 and the user's shapes) -> validated [`Config`].
mod model;
pub use model::*;
