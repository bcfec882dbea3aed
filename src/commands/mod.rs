//! One module per subcommand: each turns its arguments into calls on the
//! library and its outcome into output and an exit code.

pub mod sync;
pub mod validate;

use crate::cli::GlobalArgs;
use crate::config::{Environment, LoadOptions};

pub(crate) fn load_options(global: &GlobalArgs) -> LoadOptions {
    LoadOptions { database_url_template: global.database_url_template.clone(), env: Environment::process() }
}
