//! Decodes arbitrary bytes as one message. The decoder must not panic, a
//! message it accepts must survive re-encoding unchanged, and the ERR_REPLY
//! for one it refuses must itself be a valid message.
#![no_main]

use bytes::Bytes;
use canopy_proto::{decode, encode_to_vec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check(&Bytes::copy_from_slice(data));
});

fn check(buf: &Bytes) {
    match decode(buf) {
        Ok(m) => {
            let again = decode(&Bytes::from(encode_to_vec(&m)));
            assert_eq!(again.as_ref(), Ok(&m), "re-encoding changed the message");
        }
        Err(e) => {
            if let Some(reply) = e.to_err_reply() {
                assert_eq!(Some(reply.header.xid), e.xid);
                let again = decode(&Bytes::from(encode_to_vec(&reply)));
                assert_eq!(again.as_ref(), Ok(&reply), "ERR_REPLY does not decode");
            }
        }
    }
}
