//! Fuzzes the frame decoder: no input may panic, and whatever decodes must
//! encode back to a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zlayer_tunnel::protocol::Message;

fuzz_target!(|data: &[u8]| {
    let Ok((message, used)) = Message::decode(data) else {
        return;
    };
    assert!(used <= data.len());
    let again = message.encode();
    let (decoded, _) = Message::decode(&again).expect("a re-encoded frame decodes");
    assert_eq!(decoded, message);
    let _ = Message::decode_bytes(&bytes::Bytes::copy_from_slice(data));
});
