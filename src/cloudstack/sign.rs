//! CloudStack request signing, shared by the client (which signs) and the
//! emulator (which verifies), so that both agree byte for byte.
//!
//! CloudStack's server rebuilds the signed string from the parameters it
//! received: it sorts the names with Java's `Collections.sort` (case-
//! sensitive, so `Zone` sorts before `apiKey`), encodes each value with
//! `URLEncoder.encode(value, "UTF-8")` and turns the resulting `+` into
//! `%20`, joins `name=value` pairs with `&`, and lower-cases the whole
//! string before the HMAC-SHA1. Lower-casing happens *after* sorting, which
//! is why a client that sorts case-insensitively computes a different
//! signature whenever mixed-case names are present.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;

type HmacSha1 = Hmac<Sha1>;

/// The name of the parameter that carries the signature; it is never part of
/// the signed string.
const SIGNATURE: &str = "signature";

/// Java URLEncoder.encode(s, UTF-8), then "+" → "%20": unreserved are A-Z a-z 0-9 . - * _ ; everything else (including '~') is %XX with upper-case hex of the UTF-8 bytes.
pub fn encode(value: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(value.len());
    for &byte in value.as_bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'-' | b'*' | b'_') {
            out.push(char::from(byte));
        } else {
            // Java writes a space as '+', which CloudStack then rewrites to
            // "%20"; a literal '+' was already "%2B", so the net effect is
            // plain percent-encoding of every other byte.
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
    }
    out
}

/// The parameters to sign, without `signature`, in CloudStack's order:
/// by name, byte order. The sort is stable, so repeated names keep the
/// order in which they were given.
fn sorted(params: &[(String, String)]) -> Vec<&(String, String)> {
    let mut list: Vec<_> = params.iter().filter(|(n, _)| n != SIGNATURE).collect();
    list.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    list
}

/// What CloudStack signs: the parameters except `signature`, sorted by name in byte order (case-SENSITIVE), each `name=encode(value)`, joined with '&', the whole string lower-cased.
pub fn string_to_sign(params: &[(String, String)]) -> String {
    sorted(params)
        .into_iter()
        .map(|(name, value)| format!("{name}={}", encode(value)))
        .collect::<Vec<_>>()
        .join("&")
        .to_lowercase()
}

fn mac(params: &[(String, String)], secret: &str) -> HmacSha1 {
    // HMAC takes keys of any length (long ones are hashed first), so this
    // constructor cannot fail; the fallback is there only to avoid a panic
    // path and is never taken.
    let mut mac = match HmacSha1::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => HmacSha1::new(&Default::default()),
    };
    mac.update(string_to_sign(params).as_bytes());
    mac
}

/// Base64 (standard, padded) of HMAC-SHA1(secret, string_to_sign(params)).
pub fn signature(params: &[(String, String)], secret: &str) -> String {
    STANDARD.encode(mac(params, secret).finalize().into_bytes())
}

/// A query string for the request: the parameters (same sorted order) as `name=encode(value)` joined by '&', then `&signature=encode(signature)`.
///
/// Names go through [`encode`] as well, so the query parses back into exactly
/// the given pairs; for ordinary names (letters and digits) this changes
/// nothing. A `signature` entry in `params` is dropped, as it is not signed.
pub fn signed_query(params: &[(String, String)], secret: &str) -> String {
    let mut query = String::new();
    for (name, value) in sorted(params) {
        query.push_str(&encode(name));
        query.push('=');
        query.push_str(&encode(value));
        query.push('&');
    }
    query.push_str(SIGNATURE);
    query.push('=');
    query.push_str(&encode(&signature(params, secret)));
    query
}

/// True when `provided` (already URL-decoded) equals the signature of `params` (constant-time compare).
///
/// The comparison is done on the decoded MAC by `hmac`'s `verify_slice`,
/// which is constant-time; a `provided` that is not valid padded Base64 can
/// never equal what [`signature`] produces and is rejected outright.
pub fn verify(params: &[(String, String)], secret: &str, provided: &str) -> bool {
    match STANDARD.decode(provided) {
        Ok(tag) => mac(params, secret).verify_slice(&tag).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    //! Expected values were computed independently with Python's `hmac`,
    //! `hashlib` and `base64` and a small re-implementation of Java's
    //! `URLEncoder`, then hard-coded here.

    use super::*;

    fn p(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn encode_matches_java_url_encoder_with_space_as_percent_20() {
        assert_eq!(encode("a b+c/d~e*f.g-h_i"), "a%20b%2Bc%2Fd%7Ee*f.g-h_i");
        assert_eq!(encode("é"), "%C3%A9");
        assert_eq!(encode("日本"), "%E6%97%A5%E6%9C%AC");
        assert_eq!(encode(""), "");
        assert_eq!(
            encode("2026-12-03T19:00:00+0000"),
            "2026-12-03T19%3A00%3A00%2B0000"
        );
        assert_eq!(encode("AZaz09"), "AZaz09");
    }

    #[test]
    fn mixed_case_names_sort_upper_case_first() {
        let params = p(&[
            ("command", "listVolumes"),
            (
                "apiKey",
                "plgWJfZK4gyS3mOMTVmjUVg-X-jlWlnfaUJ9GAbBbf9EdM-kAYMmAiLqzzq1ElZLYq_u38zCm0bewzGUdP66mg",
            ),
            ("response", "json"),
            ("Zone", "Zone A"),
            ("id", "9f0b2c4e-1d3a-4b5c-8e7f-0a1b2c3d4e5f"),
        ]);
        assert_eq!(
            string_to_sign(&params),
            "zone=zone%20a&apikey=plgwjfzk4gys3momtvmjuvg-x-jlwlnfauj9gabbbf9edm-kaymmailqzzq1elzlyq_u38zcm0bewzgudp66mg&command=listvolumes&id=9f0b2c4e-1d3a-4b5c-8e7f-0a1b2c3d4e5f&response=json"
        );
        let secret = "VDaACYb0LV9eNjTetIOElcVQkvJck_J_QljX_FcHRj87ZKiy0z0ty0ZsYBkoXkY9b7eq1EhwJaw7FF3akA3KBQ";
        assert_eq!(signature(&params, secret), "SsL5WUq1MVV6y1NIAkK0sDbaa8A=");
    }

    #[test]
    fn empty_values_spaces_reserved_and_non_ascii() {
        let params = p(&[
            ("command", "attachVolume"),
            ("apiKey", "key"),
            ("empty", ""),
            ("name", "my vol+1/2~x"),
            ("label", "é日本"),
            ("signatureversion", "3"),
            ("expires", "2026-12-03T19:00:00+0000"),
        ]);
        assert_eq!(
            string_to_sign(&params),
            "apikey=key&command=attachvolume&empty=&expires=2026-12-03t19%3a00%3a00%2b0000&label=%c3%a9%e6%97%a5%e6%9c%ac&name=my%20vol%2b1%2f2%7ex&signatureversion=3"
        );
        assert_eq!(signature(&params, "s3cr3t"), "TY9WZtCFDP1ylYu7qh5aIszGYOM=");
    }

    #[test]
    fn case_insensitive_sort_gives_another_signature() {
        let params = p(&[
            ("command", "listVolumes"),
            ("apiKey", "key"),
            ("Zebra", "z"),
            ("apple", "a"),
        ]);
        assert_eq!(
            string_to_sign(&params),
            "zebra=z&apikey=key&apple=a&command=listvolumes"
        );
        let right = signature(&params, "s3cr3t");
        assert_eq!(right, "zKQE1xwk+8qXhWGnOsUMwcbTj+g=");
        // What a client sorting case-insensitively would send (Python value
        // for "apikey=key&apple=a&command=listvolumes&zebra=z").
        let wrong = "RRuQjPFvqQYlLb7WLLZLXGc5XjQ=";
        assert_ne!(right, wrong);
        assert!(verify(&params, "s3cr3t", &right));
        assert!(!verify(&params, "s3cr3t", wrong));
    }

    #[test]
    fn signature_parameter_is_not_signed() {
        let mut params = p(&[("command", "listVolumes"), ("apiKey", "key")]);
        let before = signature(&params, "s");
        params.push(("signature".into(), "anything".into()));
        assert_eq!(signature(&params, "s"), before);
        assert!(verify(&params, "s", &before));
        assert_eq!(signature(&[], "s"), "cdWK0mhC79q4otVBgYkh0gZq/r0=");
    }

    #[test]
    fn signed_query_is_sorted_and_ends_with_encoded_signature() {
        let params = p(&[
            ("command", "listVolumes"),
            ("apiKey", "key"),
            ("Zebra", "z"),
            ("apple", "a"),
            ("signature", "dropped"),
        ]);
        assert_eq!(
            signed_query(&params, "s3cr3t"),
            "Zebra=z&apiKey=key&apple=a&command=listVolumes&signature=zKQE1xwk%2B8qXhWGnOsUMwcbTj%2Bg%3D"
        );
        assert_eq!(
            signed_query(&[], "s"),
            "signature=cdWK0mhC79q4otVBgYkh0gZq%2Fr0%3D"
        );
    }

    #[test]
    fn verify_rejects_wrong_secret_tampering_and_garbage() {
        let params = p(&[("command", "listVolumes"), ("apiKey", "key"), ("id", "1")]);
        let sig = signature(&params, "s");
        assert!(verify(&params, "s", &sig));
        assert!(!verify(&params, "other", &sig));
        let tampered = p(&[("command", "listVolumes"), ("apiKey", "key"), ("id", "2")]);
        assert!(!verify(&tampered, "s", &sig));
        assert!(!verify(&params, "s", "not base64!"));
        assert!(!verify(&params, "s", ""));
        assert!(!verify(&params, "s", sig.trim_end_matches('=')));
    }
}
