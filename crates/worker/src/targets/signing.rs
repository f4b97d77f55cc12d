//! The signature of every call (HMAC-SHA256 over the time and the body, as Stripe's webhooks
//! are signed), so a target can tell offload's calls from anyone else's.

use std::{fmt, str::FromStr, sync::Arc};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The key of the targets' signatures; never shown by `Debug`, so never logged.
#[derive(Clone)]
pub struct SigningSecret(Arc<[u8]>);

impl FromStr for SigningSecret {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() {
            return Err("the signing secret is empty".into());
        }
        Ok(Self(text.as_bytes().into()))
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(***)")
    }
}

impl SigningSecret {
    /// The `Offload-Signature` value for `body` sent at `unix_seconds`.
    pub fn sign(&self, unix_seconds: u64, body: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(unix_seconds.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!(
            "t={unix_seconds},v1={}",
            hex::encode(mac.finalize().into_bytes())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_the_stripe_scheme() {
        let secret: SigningSecret = "whsec_test".parse().expect("a secret");
        // Computed independently, with Python: hmac.new(b"whsec_test", b'{t}.{body}', sha256)
        assert_eq!(
            secret.sign(1_700_000_000, br#"{"a":1}"#),
            "t=1700000000,v1=38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789"
        );
        assert_eq!(format!("{secret:?}"), "SigningSecret(***)");
    }
}
