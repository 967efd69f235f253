//! The wire protocol: code generated from `proto/contact.proto` (into
//! `OUT_DIR`, see `build.rs`) and the metadata that carries a client's id.
//! The proto's `Result` message is re-exported as `ResultMsg` so that it
//! never shadows `std`'s or grpcio's `Result`.

#[allow(warnings, clippy::all)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/mod.rs"));
}

pub use generated::contact::{ClientMsg, Empty, Result as ResultMsg, ServerMsg};
pub use generated::contact_grpc::{create_contact, Contact, ContactClient};

/// Request metadata key that names the calling client on all three calls.
pub const CLIENT_ID_KEY: &str = "contact-client-id";

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
            let id =
                std::str::from_utf8(value).map_err(|_| "client id is not UTF-8".to_string())?;
            validate_client_id(id)?;
            return Ok(Some(id.to_string()));
        }
    }
    Ok(None)
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
