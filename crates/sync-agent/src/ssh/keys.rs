//! The agent's SSH client keys, loaded from files named in its configuration. Keys never leave
//! the process: they are not stored, sent or logged (only their public fingerprints are).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use russh::keys::{HashAlg, PrivateKey};

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No key file was configured.
    #[error("no SSH key configured: pass --ssh-key PATH (may be repeated)")]
    NoKeys,
    /// The file could not be read or parsed.
    #[error("cannot load SSH key {path}: {message}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// The private keys the agent offers, in order. Cheap to clone.
#[derive(Clone, Default)]
pub struct ClientKeys {
    keys: Arc<Vec<Arc<PrivateKey>>>,
}

impl std::fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.fingerprints()).finish()
    }
}

impl ClientKeys {
    /// Loads unencrypted OpenSSH private keys from `paths`, in order.
    pub fn load<P: AsRef<Path>>(paths: &[P]) -> Result<Self, KeyError> {
        if paths.is_empty() {
            return Err(KeyError::NoKeys);
        }
        let keys = paths
            .iter()
            .map(|path| {
                let path = path.as_ref();
                russh::keys::load_secret_key(path, None)
                    .map(Arc::new)
                    .map_err(|err| KeyError::Load {
                        path: path.to_owned(),
                        message: match err {
                            russh::keys::Error::KeyIsEncrypted => {
                                "the key is encrypted; give the agent an unencrypted key file \
                                 readable only by its user"
                                    .to_owned()
                            }
                            other => other.to_string(),
                        },
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            keys: Arc::new(keys),
        })
    }

    /// The keys, in the order they are offered.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<PrivateKey>> {
        self.keys.iter()
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// `ALGORITHM SHA256:...` of each public key, for logs.
    pub fn fingerprints(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|key| {
                format!(
                    "{} {}",
                    key.algorithm().as_str(),
                    key.public_key().fingerprint(HashAlg::Sha256)
                )
            })
            .collect()
    }
}
