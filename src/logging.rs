//! Log output: text or JSON lines on stderr, level from `RUST_LOG` (default
//! `info`). Dependencies may log only warnings and errors, whatever
//! `RUST_LOG` says: tokio-postgres prints statement parameters (tokens) at
//! debug and the server's NOTICEs at info, the HTTP stack prints request
//! URLs (webhook codes) at trace, and the migration runner chats at info.

use tracing::Level;
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

use crate::cli::LogFormat;

pub fn init(format: LogFormat) {
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ours_or_quiet = filter_fn(|meta| *meta.level() <= Level::WARN || meta.target().starts_with("crm_connect"));
    let layer = fmt::layer().with_writer(std::io::stderr);
    let layer = match format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer.json().flatten_event(true).boxed(),
    };
    // A second init (tests calling into the library) keeps the first.
    let _ = tracing_subscriber::registry().with(layer.with_filter(ours_or_quiet).with_filter(env)).try_init();
}
