//! The `http` kind (to be written).

use std::sync::Arc;

use crate::job::Registry;

use super::HttpConfig;

/// Registers `http` with `config`.
pub fn register(_registry: &mut Registry, _config: Arc<HttpConfig>) {}
