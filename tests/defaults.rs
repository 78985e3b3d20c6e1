//! Defaults that the daemon and its client must agree on, though neither module imports the other.

use batchd::client::DEFAULT_MAX_MESSAGE;
use batchd::config::Config;

#[test]
fn batchctl_sends_requests_a_default_daemon_accepts() {
    assert_eq!(
        DEFAULT_MAX_MESSAGE,
        Config::default().max_message_size.as_usize()
    );
}
