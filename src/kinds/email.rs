//! The `email` kind (to be written).

use std::sync::Arc;

use crate::job::Registry;

use super::EmailConfig;

/// Registers `email` with `config`.
pub fn register(_registry: &mut Registry, _config: Arc<EmailConfig>) {}
