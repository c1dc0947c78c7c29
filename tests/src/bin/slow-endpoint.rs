//! An endpoint for process-level tests: handles `tests.work` slowly, prints `started N` and
//! `done N` for each message, and stops gracefully on SIGINT/SIGTERM.
//!
//! Usage: `slow-endpoint QUEUE ERROR_QUEUE HANDLER_MILLIS` (RabbitMQ at RHINOBUS_AMQP_URL).

use rhinobus::transport::RabbitMq;
use rhinobus::{Context, Endpoint, HandlerError};
use rhinobus_tests::Work;
use std::io::Write;
use std::time::Duration;

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, queue, error, millis] = args.as_slice() else {
        eprintln!("usage: slow-endpoint QUEUE ERROR_QUEUE HANDLER_MILLIS");
        std::process::exit(2);
    };
    let pause = Duration::from_millis(millis.parse().expect("HANDLER_MILLIS is a number"));
    let endpoint = Endpoint::builder(queue.as_str(), RabbitMq::from_env())
        .error_queue(error.as_str())
        .concurrency(4)
        .handle(move |w: Work, _: Context| async move {
            say(format!("started {}", w.n));
            tokio::time::sleep(pause).await;
            say(format!("done {}", w.n));
            Ok::<_, HandlerError>(())
        })
        .start()
        .await
        .unwrap_or_else(|e| {
            eprintln!("slow-endpoint: {e}");
            std::process::exit(1);
        });
    say("ready".into());
    endpoint.run_until_signal().await;
    say("stopped".into());
}
