//! Authentication of brokers on the internal listener (inter-broker APIs).
//!
//! Every broker of a cluster reads the same secret from `cluster.secret_file`. A connecting
//! broker proves it holds the secret with an HMAC-SHA256 challenge/response, and so does the
//! broker it connects to (so a follower cannot be fed data by an impostor leader):
//!
//! 1. peer → broker: `PeerAuthBegin { broker_id: P, client_nonce: Nc }`
//! 2. broker → peer: `{ broker_id: B, server_nonce: Ns, server_proof: HMAC(k, "server" | Nc | Ns | B) }`;
//!    the peer checks the proof.
//! 3. peer → broker: `PeerAuthProve { proof: HMAC(k, "client" | Ns | Nc | P) }`; the broker checks
//!    it (constant-time) and from then on serves inter-broker APIs on that connection.
//!
//! Both nonces are 32 fresh bytes from the OS, so a recorded exchange cannot be replayed; the
//! role labels keep one side's proof from being reflected as the other's.

use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Length of each nonce and of each proof.
pub const NONCE_BYTES: usize = 32;
/// A shorter secret is refused: it could be guessed.
pub const SECRET_BYTES_MIN: usize = 16;
/// A longer file is surely not a secret file.
pub const SECRET_BYTES_MAX: usize = 4096;

type HmacSha256 = Hmac<Sha256>;

/// The cluster secret. Its `Debug` never prints the bytes.
#[derive(Clone)]
pub struct ClusterSecret(Arc<[u8]>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterSecret({} bytes)", self.0.len())
    }
}

impl ClusterSecret {
    /// The secret from bytes (surrounding whitespace, such as a trailing newline, is cut).
    pub fn new(bytes: &[u8]) -> Result<ClusterSecret, String> {
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < SECRET_BYTES_MIN {
            return Err(format!(
                "the cluster secret has {} bytes; at least {SECRET_BYTES_MIN} are needed",
                trimmed.len()
            ));
        }
        if trimmed.len() > SECRET_BYTES_MAX {
            return Err(format!(
                "the cluster secret has {} bytes; at most {SECRET_BYTES_MAX} are allowed",
                trimmed.len()
            ));
        }
        Ok(ClusterSecret(Arc::from(trimmed)))
    }

    /// Reads `cluster.secret_file`. A file others may read is refused: anyone on the host
    /// could then join the cluster.
    pub fn load(path: &std::path::Path) -> Result<ClusterSecret, String> {
        use std::os::unix::fs::PermissionsExt;
        let what = |e: std::io::Error| format!("cluster.secret_file {}: {e}", path.display());
        let metadata = std::fs::metadata(path).map_err(what)?;
        if metadata.permissions().mode() & 0o007 != 0 {
            return Err(format!(
                "cluster.secret_file {} may be read by other users (mode {:o}); chmod 600 it",
                path.display(),
                metadata.permissions().mode() & 0o777
            ));
        }
        let bytes = std::fs::read(path).map_err(what)?;
        ClusterSecret::new(&bytes)
            .map_err(|e| format!("cluster.secret_file {}: {e}", path.display()))
    }

    fn mac(&self, label: &[u8], first: &[u8], second: &[u8], broker_id: u32) -> HmacSha256 {
        let Ok(mut mac) = HmacSha256::new_from_slice(&self.0) else {
            unreachable!("HMAC takes keys of any length");
        };
        mac.update(label);
        mac.update(first);
        mac.update(second);
        mac.update(&broker_id.to_le_bytes());
        mac
    }

    /// The answering broker's proof (step 2).
    pub fn server_proof(
        &self,
        client_nonce: &[u8],
        server_nonce: &[u8],
        server_id: u32,
    ) -> Vec<u8> {
        self.mac(
            b"wharf-peer-auth/server",
            client_nonce,
            server_nonce,
            server_id,
        )
        .finalize()
        .into_bytes()
        .to_vec()
    }

    /// The connecting broker's proof (step 3).
    pub fn client_proof(
        &self,
        server_nonce: &[u8],
        client_nonce: &[u8],
        client_id: u32,
    ) -> Vec<u8> {
        self.mac(
            b"wharf-peer-auth/client",
            server_nonce,
            client_nonce,
            client_id,
        )
        .finalize()
        .into_bytes()
        .to_vec()
    }

    /// Checks a server proof in constant time.
    pub fn verify_server(
        &self,
        client_nonce: &[u8],
        server_nonce: &[u8],
        server_id: u32,
        proof: &[u8],
    ) -> bool {
        server_nonce.len() == NONCE_BYTES
            && self
                .mac(
                    b"wharf-peer-auth/server",
                    client_nonce,
                    server_nonce,
                    server_id,
                )
                .verify_slice(proof)
                .is_ok()
    }

    /// Checks a client proof in constant time.
    pub fn verify_client(
        &self,
        server_nonce: &[u8],
        client_nonce: &[u8],
        client_id: u32,
        proof: &[u8],
    ) -> bool {
        client_nonce.len() == NONCE_BYTES
            && self
                .mac(
                    b"wharf-peer-auth/client",
                    server_nonce,
                    client_nonce,
                    client_id,
                )
                .verify_slice(proof)
                .is_ok()
    }
}

/// Fresh random bytes from the OS.
pub fn nonce() -> Result<[u8; NONCE_BYTES], String> {
    let mut bytes = [0u8; NONCE_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| format!("cannot draw a random nonce: {e}"))?;
    Ok(bytes)
}

/// What a connecting broker presents: its id and the secret.
#[derive(Clone, Debug)]
pub struct PeerCredentials {
    pub broker_id: u32,
    pub secret: ClusterSecret,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(text: &str) -> ClusterSecret {
        ClusterSecret::new(text.as_bytes()).expect("valid secret")
    }

    #[test]
    fn proofs_verify_only_with_the_same_secret_nonces_id_and_role() {
        let k = secret("correct horse battery staple\n");
        let other = secret("another secret of enough bytes");
        let (nc, ns) = (nonce().expect("nonce"), nonce().expect("nonce"));
        assert_ne!(nc, ns);
        let server = k.server_proof(&nc, &ns, 2);
        assert!(k.verify_server(&nc, &ns, 2, &server));
        assert!(!other.verify_server(&nc, &ns, 2, &server), "wrong secret");
        assert!(!k.verify_server(&nc, &ns, 3, &server), "wrong broker id");
        assert!(!k.verify_server(&ns, &nc, 2, &server), "nonces swapped");
        let client = k.client_proof(&ns, &nc, 1);
        assert!(k.verify_client(&ns, &nc, 1, &client));
        assert!(
            !k.verify_client(&ns, &nc, 1, &server),
            "a server proof reflected"
        );
        assert!(!k.verify_client(&nc, &ns, 1, &client));
        let mut flipped = client.clone();
        flipped[0] ^= 1;
        assert!(!k.verify_client(&ns, &nc, 1, &flipped));
        assert!(
            !k.verify_client(&ns, &nc, 1, &client[..16]),
            "a truncated proof"
        );
        assert!(!k.verify_client(&ns, &nc[..8], 1, &client), "a short nonce");
    }

    #[test]
    fn short_long_and_readable_secrets_are_refused() {
        assert!(ClusterSecret::new(b"short\n").is_err());
        assert!(ClusterSecret::new(&[b'x'; SECRET_BYTES_MAX + 1]).is_err());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "a secret that is long enough\n").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let refused = ClusterSecret::load(&path).expect_err("world-readable");
        assert!(refused.contains("chmod 600"), "{refused}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(ClusterSecret::load(&path).is_ok());
        assert!(!format!("{:?}", ClusterSecret::load(&path)).contains("long enough"));
    }
}
