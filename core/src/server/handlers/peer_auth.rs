//! PeerAuthBegin and PeerAuthProve (inter-broker): the broker's side of the handshake in which
//! a peer of the internal listener proves the cluster secret (`crate::peer_auth` has the
//! scheme). A failed step closes the connection.

use crate::protocol::*;
use crate::server::connection::{ConnectionContext, PeerAuthState};
use crate::server::dispatch::topic_error;
use crate::server::shard::Shard;

impl Shard {
    /// The broker's side of the peer handshake (`crate::peer_auth` has the scheme).
    pub(crate) fn peer_auth_begin(
        &self,
        request: PeerAuthBeginRequest,
        context: &ConnectionContext,
    ) -> PeerAuthBeginResponse {
        let config = &self.shared.config;
        let refuse = |message: String| {
            context.close_after_response.set(true);
            self.metrics.peer_auth_failures.inc();
            tracing::warn!(shard = self.id, peer = %context.peer, broker_id = request.broker_id, %message, "peer authentication refused; closing");
            PeerAuthBeginResponse {
                error: ErrorCode::AuthenticationFailed as u16,
                message,
                broker_id: config.broker_id,
                server_nonce: Vec::new(),
                server_proof: Vec::new(),
            }
        };
        let Some(secret) = &self.shared.secret else {
            return refuse("this broker has no cluster secret".to_string());
        };
        if *context.auth.borrow() != PeerAuthState::NotStarted {
            return refuse("the handshake was already begun on this connection".to_string());
        }
        if !config
            .cluster
            .brokers
            .iter()
            .any(|b| b.id == request.broker_id)
        {
            return refuse(format!(
                "broker {} is not listed in cluster.brokers",
                request.broker_id
            ));
        }
        let Ok(client_nonce) =
            <[u8; crate::peer_auth::NONCE_BYTES]>::try_from(request.client_nonce.as_slice())
        else {
            return refuse(format!(
                "the nonce must have {} bytes",
                crate::peer_auth::NONCE_BYTES
            ));
        };
        let server_nonce = match crate::peer_auth::nonce() {
            Ok(nonce) => nonce,
            Err(message) => return refuse(message),
        };
        *context.auth.borrow_mut() = PeerAuthState::Challenged {
            broker_id: request.broker_id,
            client_nonce,
            server_nonce,
        };
        PeerAuthBeginResponse {
            error: 0,
            message: String::new(),
            broker_id: config.broker_id,
            server_nonce: server_nonce.to_vec(),
            server_proof: secret.server_proof(&client_nonce, &server_nonce, config.broker_id),
        }
    }

    pub(crate) fn peer_auth_prove(
        &self,
        request: PeerAuthProveRequest,
        context: &ConnectionContext,
    ) -> TopicResult {
        let state = *context.auth.borrow();
        let verified = match (state, &self.shared.secret) {
            (
                PeerAuthState::Challenged {
                    broker_id,
                    client_nonce,
                    server_nonce,
                },
                Some(secret),
            ) => secret
                .verify_client(&server_nonce, &client_nonce, broker_id, &request.proof)
                .then_some(broker_id),
            _ => None,
        };
        match verified {
            Some(broker_id) => {
                *context.auth.borrow_mut() = PeerAuthState::Authenticated { broker_id };
                tracing::debug!(shard = self.id, peer = %context.peer, broker_id, "peer authenticated");
                topic_error(ErrorCode::None, "")
            }
            None => {
                context.close_after_response.set(true);
                self.metrics.peer_auth_failures.inc();
                tracing::warn!(shard = self.id, peer = %context.peer, "a peer failed to prove the cluster secret; closing");
                topic_error(
                    ErrorCode::AuthenticationFailed,
                    "the proof does not match the cluster secret",
                )
            }
        }
    }
}
