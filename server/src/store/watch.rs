//! The store checked even when nothing is pushed (seed 004, items 3 and 4): a lost
//! connection is noticed, logged once, and the pool reconnects before the next push
//! needs it. One warning line when the store stops answering, one info line when it
//! answers again, nothing in between: an outage of hours is two lines, not a flood.

use std::time::Duration;

use super::Store;

/// Checks `store` every `every`, forever (the task is dropped with the server).
pub async fn watch<S: Store>(store: S, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut answering = true;
    loop {
        tick.tick().await;
        match store.ready().await {
            Ok(()) if !answering => {
                tracing::info!("store: answering again");
                answering = true;
            }
            Err(e) if answering => {
                tracing::warn!(
                    "{e}; /ready answers 503 until it answers again (checked every {every:?})"
                );
                answering = false;
            }
            _ => {}
        }
    }
}
