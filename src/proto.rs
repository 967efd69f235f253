//! The wire protocol: code generated from `proto/contact.proto` and
//! `proto/admin.proto` (into `OUT_DIR`, see `build.rs`) and the metadata that carries a client's id.
//! The proto's `Result` message is re-exported as `ResultMsg` so that it
//! never shadows `std`'s or grpcio's `Result`.

#[allow(warnings, clippy::all)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/mod.rs"));
}

pub use generated::contact::{ClientMsg, Empty, Result as ResultMsg, ServerMsg, Working};
pub use generated::contact_grpc::{create_contact, Contact, ContactClient};

/// The operators' service (`proto/admin.proto`, package `contact.admin.v1`).
pub mod admin {
    pub use super::generated::admin::*;
    pub use super::generated::admin_grpc::*;
}

/// Request metadata key that names the calling client on all three calls.
pub const CLIENT_ID_KEY: &str = "contact-client-id";

/// Request metadata key that names the client *process* (random per run): a
/// reconnecting client may take its own id over; another process may not.
pub const INSTANCE_KEY: &str = "contact-client-instance";

/// The caller's instance, or "" when absent or unusable (which matches no one).
pub fn instance_from(headers: &grpcio::Metadata) -> String {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(INSTANCE_KEY))
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
        .filter(|v| v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or_default()
        .to_string()
}

/// Request metadata key with which a client says, on `getTask`, that it
/// reports the tasks it is working on (`ClientMsg.working`): the ack deadline
/// of its tasks then starts when it starts them (see `dispatch`).
pub const LEASES_KEY: &str = "contact-leases";

/// Whether the caller set [`LEASES_KEY`] to `1`.
pub fn leases_from(headers: &grpcio::Metadata) -> bool {
    headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case(LEASES_KEY) && v == b"1")
}

/// Longest client id accepted.
pub const MAX_CLIENT_ID_LEN: usize = 128;

/// Checks a client id: non-empty, at most [`MAX_CLIENT_ID_LEN`] bytes,
/// printable ASCII without spaces (it is used in logs, files and `@target` lines).
pub fn validate_client_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("client id is empty".into());
    }
    if id.len() > MAX_CLIENT_ID_LEN {
        return Err(format!(
            "client id is {} bytes long; the limit is {MAX_CLIENT_ID_LEN}",
            id.len()
        ));
    }
    if let Some(c) = id.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "client id {id:?} contains {c:?}; use printable ASCII without spaces"
        ));
    }
    Ok(())
}

/// The client id carried by request metadata: `Ok(None)` when absent (a seed
/// peer), an error saying what is wrong when present but unusable.
pub fn client_id_from(headers: &grpcio::Metadata) -> Result<Option<String>, String> {
    for (key, value) in headers.iter() {
        if key.eq_ignore_ascii_case(CLIENT_ID_KEY) {
            return client_id_from_value(value).map(Some);
        }
    }
    Ok(None)
}

/// The client id in one metadata value, whatever bytes a peer sent.
fn client_id_from_value(value: &[u8]) -> Result<String, String> {
    let id = std::str::from_utf8(value).map_err(|_| "client id is not UTF-8".to_string())?;
    validate_client_id(id)?;
    Ok(id.to_string())
}

/// Metadata naming `id`, to attach to every call of a client.
pub fn client_id_metadata(id: &str) -> Result<grpcio::Metadata, grpcio::Error> {
    let mut b = grpcio::MetadataBuilder::new();
    b.add_str(CLIENT_ID_KEY, id)?;
    Ok(b.build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_round_trip_through_metadata_and_bad_ones_are_named() {
        let md = client_id_metadata("agent-7").unwrap();
        assert_eq!(client_id_from(&md).unwrap().as_deref(), Some("agent-7"));
        assert_eq!(
            client_id_from(&grpcio::MetadataBuilder::new().build()).unwrap(),
            None
        );
        assert!(validate_client_id("").is_err());
        assert!(validate_client_id("has space").unwrap_err().contains("' '"));
        assert!(validate_client_id(&"x".repeat(129))
            .unwrap_err()
            .contains("129"));
    }

    #[test]
    fn new_fields_do_not_disturb_the_seed_encoding() {
        use protobuf::Message;
        // A seed peer's Result{ret="hi"} is field 1 only: bytes 0a 02 'h' 'i'.
        let seed = ResultMsg {
            ret: "hi".into(),
            ..Default::default()
        };
        assert_eq!(seed.write_to_bytes().unwrap(), b"\x0a\x02hi");
        // Our fields decode as absent from seed bytes, and seed decoders skip ours.
        let ours = ResultMsg {
            ret: "hi".into(),
            task_id: 7,
            ok: true,
            attempt: 2,
            ..Default::default()
        };
        let bytes = ours.write_to_bytes().unwrap();
        let back = ResultMsg::parse_from_bytes(&bytes).unwrap();
        assert_eq!((back.task_id, back.ok, back.attempt), (7, true, 2));
        assert_eq!(
            ResultMsg::parse_from_bytes(b"\x0a\x02hi").unwrap().task_id,
            0
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// What a valid id is, said once more in the plainest terms.
    fn is_valid(id: &[u8]) -> bool {
        (1..=MAX_CLIENT_ID_LEN).contains(&id.len()) && id.iter().all(|b| (b'!'..=b'~').contains(b))
    }

    /// Every valid id: 1 to 128 ASCII graphic characters.
    fn valid_id() -> impl Strategy<Value = String> {
        "[!-~]{1,128}"
    }

    /// Strings near the boundary: mostly valid characters with the odd
    /// space, control, DEL or non-ASCII one, around the length limit.
    fn near_valid() -> impl Strategy<Value = String> {
        prop_oneof![
            r"[!-~ \t\x00\x7f\u{e9}\u{2028}]{0,4}",
            "[!-~]{120,140}",
            r"[!-~]{0,70}[ \x00\x7f\u{e9}\u{ff}\u{1F600}][!-~]{0,70}",
            any::<String>(),
        ]
    }

    /// Metadata entries other than the client id (binary ones included).
    fn other_entries() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
        prop::collection::vec(
            (
                "[a-z][a-z0-9_.-]{0,12}",
                prop::collection::vec(0x20u8..0x7f, 0..20),
            ),
            0..4,
        )
        .prop_map(|entries| {
            entries
                .into_iter()
                .filter(|(k, _)| k != CLIENT_ID_KEY && !k.starts_with(CLIENT_ID_KEY))
                .collect()
        })
    }

    fn metadata(entries: &[(String, Vec<u8>)], id: Option<(&str, &str)>) -> grpcio::Metadata {
        let mut b = grpcio::MetadataBuilder::new();
        for (k, v) in entries {
            if k.ends_with("-bin") {
                b.add_bytes(k, v).unwrap();
            } else {
                b.add_str(k, std::str::from_utf8(v).unwrap()).unwrap();
            }
        }
        if let Some((key, value)) = id {
            b.add_str(key, value).unwrap();
        }
        for (k, v) in entries {
            // Binary entries after the id too: only the key decides.
            b.add_bytes(&format!("{k}-bin"), v).unwrap();
        }
        b.build()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_string_is_judged_without_panicking_exactly_by_the_rule(id in near_valid()) {
            let verdict = validate_client_id(&id);
            prop_assert_eq!(verdict.is_ok(), is_valid(id.as_bytes()), "{:?}: {:?}", id, verdict);
        }

        #[test]
        fn every_id_of_1_to_128_graphic_ascii_characters_is_accepted(id in valid_id()) {
            prop_assert_eq!(validate_client_id(&id), Ok(()));
        }

        #[test]
        fn a_rejected_id_is_told_what_is_wrong(id in near_valid()) {
            if let Err(why) = validate_client_id(&id) {
                if id.is_empty() {
                    prop_assert!(why.contains("empty"), "{}", why);
                } else if id.len() > MAX_CLIENT_ID_LEN {
                    prop_assert!(why.contains(&id.len().to_string()), "{}", why);
                } else {
                    let bad = id.chars().find(|c| !c.is_ascii_graphic()).unwrap();
                    prop_assert!(why.contains(&format!("{bad:?}")), "{}", why);
                }
            }
        }

        #[test]
        fn any_bytes_a_peer_sends_as_its_id_are_judged_without_panicking(
            value in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..140),
                valid_id().prop_map(String::into_bytes),
            ]
        ) {
            match client_id_from_value(&value) {
                Ok(id) => {
                    prop_assert!(is_valid(&value), "accepted {:?}", value);
                    prop_assert_eq!(id.as_bytes(), &value[..]);
                }
                Err(_) => prop_assert!(!is_valid(&value), "refused {:?}", value),
            }
        }

        #[test]
        fn every_valid_id_round_trips_through_metadata(
            id in valid_id(),
            others in other_entries(),
        ) {
            let md = client_id_metadata(&id).unwrap();
            prop_assert_eq!(client_id_from(&md), Ok(Some(id.clone())));
            let md = metadata(&others, Some((CLIENT_ID_KEY, &id)));
            prop_assert_eq!(client_id_from(&md), Ok(Some(id)));
        }

        #[test]
        fn a_printable_metadata_value_is_an_id_exactly_when_it_is_valid(
            value in "[ -~]{0,130}",
            key in prop::sample::select(vec![CLIENT_ID_KEY, "Contact-Client-Id", "CONTACT-CLIENT-ID"]),
        ) {
            let md = metadata(&[], Some((key, &value)));
            let got = client_id_from(&md);
            prop_assert_eq!(got.is_ok(), is_valid(value.as_bytes()), "{:?}: {:?}", value, got);
            if let Ok(id) = got {
                prop_assert_eq!(id, Some(value));
            }
        }

        #[test]
        fn metadata_without_the_id_key_names_no_client(others in other_entries()) {
            prop_assert_eq!(client_id_from(&metadata(&others, None)), Ok(None));
        }
    }
}
