//! Property tests of request decoding, the first thing the root server does with a client's
//! bytes: whatever arrives, decoding ends in a request, the end of the stream, or an error.

use std::io::Cursor;

use nvwa_core::protocol::{read_message, write_message, ProtocolError, Request};
use proptest::prelude::*;

/// Bytes that are sometimes almost a request.
fn request_bytes() -> impl Strategy<Value = Vec<u8>> {
    let fragment = prop::sample::select(vec![
        "{",
        "}",
        "\"request\"",
        ":",
        "\"update\"",
        "\"restore\"",
        "\"ping\"",
        "\"version\"",
        "\"service\"",
        "\"pid\"",
        ",",
        "1",
        "-1",
        "1e99",
        "null",
        "[",
        "]",
        "\\u0000",
        "\u{202e}",
        "\n",
        " ",
        "nvwa: update 6.1",
    ]);
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        prop::collection::vec(fragment, 0..16).prop_map(|f| f.concat().into_bytes()),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        any::<String>().prop_map(|version| Request::Update { version }),
        Just(Request::Init),
        Just(Request::Exit),
        Just(Request::Ping),
        (any::<String>(), any::<i32>())
            .prop_map(|(service, pid)| Request::Restore { service, pid }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn decoding_any_bytes_never_panics(bytes in request_bytes()) {
        match read_message::<Request>(&mut Cursor::new(bytes.clone())) {
            Ok(Some(_)) => {}
            // Only an empty stream is "nothing".
            Ok(None) => prop_assert!(bytes.is_empty()),
            Err(ProtocolError::Malformed { line, .. }) => {
                // The line is reported as received, so the error can name it.
                let text = String::from_utf8_lossy(&bytes);
                prop_assert!(text.contains(line.trim()), "{:?} not in {:?}", line, text);
            }
            // Invalid UTF-8 is an I/O error of read_line.
            Err(ProtocolError::Io { .. }) => prop_assert!(std::str::from_utf8(&bytes).is_err()),
            Err(ProtocolError::Closed) => prop_assert!(false, "Closed is the client's error"),
        }
    }

    #[test]
    fn encoded_requests_decode_to_themselves(req in request()) {
        let mut buf = Vec::new();
        write_message(&mut buf, &req).unwrap();
        let back = read_message::<Request>(&mut Cursor::new(buf)).unwrap();
        prop_assert_eq!(back, Some(req));
    }
}
