//! NATS identities (DESIGN.md §4 "Execution windows", issue "per-execution identity").
//!
//! NATS's decentralised authorisation ("operator mode"): an **operator** key signs **account**
//! JWTs; an account's signing key signs **user** JWTs, each carrying its own permissions and
//! expiry. The server trusts the operator, knows the accounts (preloaded in its configuration),
//! and checks every user JWT's signature, permissions and expiry itself.
//!
//! Syntropism uses one application account for services and agents (so agents reach services
//! with plain request/reply) and the system account the server needs. Services connect as users
//! without restrictions; each execution connects as a user that may publish only to
//! `agent.<agent_id>.>`, subscribe only to its own inbox prefix, and whose JWT expires at the
//! window's deadline. No payload ever carries identity: the server enforces the subject.

use std::path::Path;

use nkeys::KeyPair;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid key in {file}: {message}")]
    Key { file: String, message: String },
    #[error("signing failed: {0}")]
    Sign(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn b64(bytes: &[u8]) -> String {
    data_encoding::BASE64URL_NOPAD.encode(bytes)
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Encodes and signs a NATS JWT (`alg: ed25519-nkey`). The id (`jti`) is the base32 SHA-256
/// of the claims without it, as NATS's own tools compute it.
fn encode(
    issuer: &KeyPair,
    subject: &str,
    name: &str,
    expires: Option<i64>,
    nats: Value,
) -> Result<String, IdentityError> {
    let mut claims = json!({
        "iat": now_secs(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    if let Some(expires) = expires {
        claims["exp"] = json!(expires);
    }
    let unsigned = serde_json::to_vec(&claims).expect("claims serialise");
    claims["jti"] = json!(data_encoding::BASE32_NOPAD.encode(&Sha256::digest(&unsigned)));
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = b64(&serde_json::to_vec(&claims).expect("claims serialise"));
    let signing_input = format!("{header}.{body}");
    let signature = issuer
        .sign(signing_input.as_bytes())
        .map_err(|e| IdentityError::Sign(e.to_string()))?;
    Ok(format!("{signing_input}.{}", b64(&signature)))
}

/// A user's JWT and the seed that proves it: what a NATS client connects with.
#[derive(Clone)]
pub struct Credentials {
    pub jwt: String,
    pub seed: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

impl Credentials {
    /// The `.creds` file format every NATS client reads.
    pub fn to_creds_file(&self) -> String {
        format!(
            "-----BEGIN NATS USER JWT-----\n{}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n",
            self.jwt, self.seed
        )
    }
}

/// What an execution may do on NATS.
#[derive(Debug, Clone)]
pub struct ExecutionGrant {
    /// The agent: the execution may publish only to `agent.<agent_id>.>`.
    pub agent_id: String,
    /// Its inbox prefix: it may subscribe only below it (replies come there).
    pub inbox_prefix: String,
    /// Unix seconds: the credentials stop working then (the server also disconnects).
    pub expires_at: i64,
    /// A name for logs, e.g. the execution id.
    pub name: String,
}

impl ExecutionGrant {
    /// The inbox prefix for an execution: unique per execution, under `_INBOX_<agent>`.
    pub fn inbox_prefix_for(agent_id: &str, execution_id: &str) -> String {
        format!("_INBOX_{agent_id}.{execution_id}")
    }
}

const FILES: [&str; 4] = [
    "operator.nk",
    "system-account.nk",
    "account.nk",
    "account-signing.nk",
];

/// The keys the system holds: the operator, the system account, the application account and
/// the key that signs its users.
pub struct Authority {
    operator: KeyPair,
    system: KeyPair,
    account: KeyPair,
    signing: KeyPair,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("operator", &self.operator.public_key())
            .field("account", &self.account.public_key())
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// New random keys.
    pub fn generate() -> Self {
        Self {
            operator: KeyPair::new_operator(),
            system: KeyPair::new_account(),
            account: KeyPair::new_account(),
            signing: KeyPair::new_account(),
        }
    }

    /// Loads the keys from `dir` (seeds, one per file).
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        let read = |file: &str| -> Result<KeyPair, IdentityError> {
            let seed = std::fs::read_to_string(dir.join(file))?;
            KeyPair::from_seed(seed.trim()).map_err(|e| IdentityError::Key {
                file: file.into(),
                message: e.to_string(),
            })
        };
        Ok(Self {
            operator: read(FILES[0])?,
            system: read(FILES[1])?,
            account: read(FILES[2])?,
            signing: read(FILES[3])?,
        })
    }

    /// Writes the keys to `dir` (created if missing; files readable by the owner only).
    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        std::fs::create_dir_all(dir)?;
        for (file, key) in
            FILES
                .iter()
                .zip([&self.operator, &self.system, &self.account, &self.signing])
        {
            let path = dir.join(file);
            let seed = key.seed().map_err(|e| IdentityError::Sign(e.to_string()))?;
            std::fs::write(&path, format!("{seed}\n"))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            }
        }
        Ok(())
    }

    /// The keys in `dir`, generated and saved there first if absent.
    pub fn load_or_generate(dir: &Path) -> Result<Self, IdentityError> {
        if dir.join(FILES[0]).exists() {
            Self::load(dir)
        } else {
            let authority = Self::generate();
            authority.save(dir)?;
            Ok(authority)
        }
    }

    pub fn account_public_key(&self) -> String {
        self.account.public_key()
    }

    fn operator_jwt(&self) -> Result<String, IdentityError> {
        let key = self.operator.public_key();
        encode(
            &self.operator,
            &key,
            "syntropism",
            None,
            json!({
                "type": "operator",
                "version": 2,
                "system_account": self.system.public_key(),
            }),
        )
    }

    fn account_jwt(
        &self,
        key: &KeyPair,
        name: &str,
        signing: Option<&KeyPair>,
    ) -> Result<String, IdentityError> {
        let mut nats = json!({
            "type": "account",
            "version": 2,
            "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1,
            },
        });
        if let Some(signing) = signing {
            nats["signing_keys"] = json!([signing.public_key()]);
            // JetStream for the application account (the events stream lives there).
            for (k, v) in [
                ("mem_storage", -1),
                ("disk_storage", -1),
                ("streams", -1),
                ("consumer", -1),
            ] {
                nats["limits"][k] = json!(v);
            }
        }
        encode(&self.operator, &key.public_key(), name, None, nats)
    }

    /// The server's authorisation settings (to `include` in a nats-server configuration):
    /// trust this operator, know these two accounts, use the system account.
    pub fn server_config(&self) -> Result<String, IdentityError> {
        Ok(format!(
            "operator: {}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {}\n  {}: {}\n}}\n",
            self.operator_jwt()?,
            self.system.public_key(),
            self.system.public_key(),
            self.account_jwt(&self.system, "SYS", None)?,
            self.account.public_key(),
            self.account_jwt(&self.account, "syntropism", Some(&self.signing))?,
        ))
    }

    fn user(
        &self,
        name: &str,
        expires: Option<i64>,
        permissions: Value,
    ) -> Result<Credentials, IdentityError> {
        let user = KeyPair::new_user();
        let mut nats = json!({
            "type": "user",
            "version": 2,
            "issuer_account": self.account.public_key(),
            "subs": -1, "data": -1, "payload": -1,
        });
        if let Value::Object(map) = permissions {
            for (k, v) in map {
                nats[k] = v;
            }
        }
        let jwt = encode(&self.signing, &user.public_key(), name, expires, nats)?;
        let seed = user
            .seed()
            .map_err(|e| IdentityError::Sign(e.to_string()))?;
        Ok(Credentials { jwt, seed })
    }

    /// Credentials for a service: everything in the application account.
    pub fn service(&self, name: &str) -> Result<Credentials, IdentityError> {
        self.user(name, None, json!({}))
    }

    /// Credentials for one execution: publish only to `agent.<id>.>`, subscribe only to its
    /// inbox prefix, valid until `expires_at`.
    pub fn execution(&self, grant: &ExecutionGrant) -> Result<Credentials, IdentityError> {
        self.user(
            &grant.name,
            Some(grant.expires_at),
            json!({
                "pub": { "allow": [format!("agent.{}.>", grant.agent_id)] },
                "sub": { "allow": [format!("{}.>", grant.inbox_prefix)] },
                // A plain client only: never a leaf node, websocket or MQTT connection.
                "allowed_connection_types": ["STANDARD"],
            }),
        )
    }
}
