//! The control socket of `archip up` (src/control/protocol.rs): request lines from any local
//! caller the socket admits, import frames, and the replies the commands parse. The protocol
//! module is compiled here from its own file (the root crate is a binary only), so this is the
//! server's and the client's code, not a copy.
#![no_main]

#[allow(dead_code)]
#[path = "../../src/control/protocol.rs"]
mod protocol;

use libfuzzer_sys::fuzz_target;
use protocol::{Envelope, Frame, Reply};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = protocol::decode_request(data) {
        // What the client would send for it decodes to the same request.
        let line = serde_json::to_vec(&Envelope::new(request.clone())).expect("serialises");
        let again = protocol::decode_request(&line).expect("an encoded request decodes");
        assert_eq!(again, request);
    }
    if let Ok(frame) = serde_json::from_slice::<Frame>(data) {
        let line = serde_json::to_vec(&frame).expect("serialises");
        assert_eq!(serde_json::from_slice::<Frame>(&line).ok(), Some(frame));
    }
    if let Ok(reply) = serde_json::from_slice::<Reply>(data) {
        let _ = serde_json::to_vec(&reply).expect("serialises");
    }
});
