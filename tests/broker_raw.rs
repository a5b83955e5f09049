//! Raw-protocol and process-level tests of the broker: malformed frames, unsupported versions,
//! corrupt batches, start-up errors, clean and unclean shutdown.

mod common;

use common::Broker;

#[test]
fn sigterm_exits_zero_and_restart_accepts() {
    let mut b = Broker::start();
    let st = b.sigterm();
    assert_eq!(st.code(), Some(0), "stderr:\n{}", b.stderr());
    b.restart();
    assert!(std::net::TcpStream::connect(b.addr).is_ok());
}
