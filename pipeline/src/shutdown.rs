//! Graceful shutdown: SIGTERM and SIGINT both cancel one token that every loop watches.

use tokio_util::sync::CancellationToken;
use tracing::info;

/// Returns a token cancelled on the first SIGTERM or SIGINT. A second signal exits at once.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutdown requested: finishing the batches in flight");
        t.cancel();
        wait_for_signal().await;
        info!("second signal: exiting now");
        std::process::exit(130);
    });
    token
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
