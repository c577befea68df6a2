//! An authenticated connection: public-key authentication with each configured key, then
//! commands, one channel each, under the command timeout and the output cap.

use std::{sync::Arc, time::Duration};

use russh::{ChannelMsg, Disconnect, client::Handle, keys::PrivateKeyWithHashAlg};
use tokio::time::timeout;
use tokio_util::sync::DropGuard;

use super::{
    ClientKeys, Handshake, HostKey, HostKeyCheck, SshClient, SshError, Stage, StageTimes, Timeouts,
};

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// Exit status; `None` if the command was ended by a signal or the server sent none.
    pub exit_status: Option<u32>,
    /// Everything it printed on stdout.
    pub stdout: Vec<u8>,
    /// Everything it printed on stderr.
    pub stderr: Vec<u8>,
}

impl CommandOutput {
    /// True if the command exited with status 0.
    pub fn success(&self) -> bool {
        self.exit_status == Some(0)
    }
}

/// An authenticated SSH connection to one server. Commands run over it one channel each.
pub struct Connection {
    handle: Handle<HostKeyCheck>,
    host_key: HostKey,
    banner: String,
    pub(super) times: StageTimes,
    timeouts: Timeouts,
    output_cap: usize,
    /// Ends russh's session task (and closes the socket) when the connection is dropped.
    _kill: DropGuard,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("host_key", &self.host_key)
            .field("banner", &self.banner)
            .finish_non_exhaustive()
    }
}

impl Connection {
    pub(super) fn new(handshake: Handshake, client: &SshClient) -> Self {
        Self {
            handle: handshake.handle,
            host_key: handshake.host_key,
            banner: handshake.banner,
            times: StageTimes {
                connect: handshake.connect,
                banner: handshake.banner_time,
                key_exchange: handshake.key_exchange_time,
                auth: Duration::ZERO,
            },
            timeouts: client.timeouts,
            output_cap: client.output_cap,
            _kill: handshake.kill,
        }
    }

    /// How long each stage took to get here.
    pub fn times(&self) -> StageTimes {
        self.times
    }

    /// The host key the server presented (equal to the pinned one, if one was given).
    pub fn host_key(&self) -> &HostKey {
        &self.host_key
    }

    /// The server's identification line, e.g. `SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3`.
    pub fn banner(&self) -> &str {
        &self.banner
    }

    /// How long the TCP connection took to establish.
    pub fn connect_latency(&self) -> Duration {
        self.times.connect
    }

    pub(super) async fn authenticate(
        &mut self,
        user: &str,
        keys: &ClientKeys,
    ) -> Result<(), SshError> {
        let limit = self.timeouts.auth;
        let attempt = async {
            for key in keys.iter() {
                let hash = if key.algorithm().is_rsa() {
                    self.handle
                        .best_supported_rsa_hash()
                        .await
                        .map_err(|err| SshError::Auth(err.to_string()))?
                        .flatten()
                } else {
                    None
                };
                let key = PrivateKeyWithHashAlg::new(Arc::clone(key), hash);
                let result = self
                    .handle
                    .authenticate_publickey(user, key)
                    .await
                    .map_err(|err| SshError::Auth(err.to_string()))?;
                if result.success() {
                    return Ok(());
                }
            }
            Err(SshError::AuthRejected {
                user: user.to_owned(),
                keys: keys.len(),
            })
        };
        timeout(limit, attempt)
            .await
            .map_err(|_| SshError::Timeout {
                stage: Stage::Auth,
                after: limit,
            })?
    }

    /// Runs `command` through the login user's shell and collects its output and exit status,
    /// under the command timeout. Output past the cap (stdout or stderr) ends the command with
    /// [`SshError::OutputTooLarge`] without buffering the rest.
    pub async fn run(&self, command: &str) -> Result<CommandOutput, SshError> {
        self.run_with_input(command, &[]).await
    }

    /// Like [`run`](Self::run), with `input` on the command's stdin (then end of file). Used
    /// to hand a query to a database client without any shell quoting.
    pub async fn run_with_input(
        &self,
        command: &str,
        input: &[u8],
    ) -> Result<CommandOutput, SshError> {
        self.open_command().await?.run(command, input).await
    }

    /// Opens the channel for one command (a round trip to the server), under the command
    /// timeout. Nothing runs on the server until [`CommandChannel::run`]: a caller can check,
    /// with no round trip left before the command, that it may still run it.
    pub async fn open_command(&self) -> Result<CommandChannel, SshError> {
        let limit = self.timeouts.command;
        let channel = timeout(limit, self.handle.channel_open_session())
            .await
            .map_err(|_| SshError::Timeout {
                stage: Stage::Command,
                after: limit,
            })?
            .map_err(|err| SshError::Channel(err.to_string()))?;
        Ok(CommandChannel {
            channel,
            limit,
            cap: self.output_cap,
        })
    }

    /// Says goodbye to the server. Dropping a connection closes it too, less politely.
    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "", "en")
            .await;
    }
}

fn append_capped(buf: &mut Vec<u8>, data: &[u8], cap: usize) -> Result<(), SshError> {
    if buf.len() + data.len() > cap {
        return Err(SshError::OutputTooLarge { limit: cap });
    }
    buf.extend_from_slice(data);
    Ok(())
}

/// An open channel, ready for one command.
#[derive(Debug)]
pub struct CommandChannel {
    channel: russh::Channel<russh::client::Msg>,
    limit: Duration,
    cap: usize,
}

impl CommandChannel {
    /// Runs `command` with `input` on its stdin (then end of file) and collects its output and
    /// exit status, under the command timeout and the output cap. The command, its input and
    /// the end of file leave together, with no round trip between them.
    pub async fn run(mut self, command: &str, input: &[u8]) -> Result<CommandOutput, SshError> {
        let (limit, cap) = (self.limit, self.cap);
        let channel = &mut self.channel;
        let collect = async {
            channel
                .exec(true, command)
                .await
                .map_err(|err| SshError::Channel(err.to_string()))?;
            if !input.is_empty() {
                channel
                    .data(input)
                    .await
                    .map_err(|err| SshError::Channel(err.to_string()))?;
            }
            channel
                .eof()
                .await
                .map_err(|err| SshError::Channel(err.to_string()))?;
            let mut output = CommandOutput {
                exit_status: None,
                stdout: Vec::new(),
                stderr: Vec::new(),
            };
            while let Some(message) = channel.wait().await {
                match message {
                    ChannelMsg::Data { data } => append_capped(&mut output.stdout, &data, cap)?,
                    ChannelMsg::ExtendedData { data, ext: 1 } => {
                        append_capped(&mut output.stderr, &data, cap)?;
                    }
                    ChannelMsg::ExitStatus { exit_status } => {
                        output.exit_status = Some(exit_status);
                    }
                    ChannelMsg::Failure => {
                        return Err(SshError::Channel(
                            "the server refused to run the command".into(),
                        ));
                    }
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
            Ok(output)
        };
        let result = match timeout(limit, collect).await {
            Ok(result) => result,
            Err(_) => Err(SshError::Timeout {
                stage: Stage::Command,
                after: limit,
            }),
        };
        if result.is_err() {
            // Best effort: the connection is dropped after a failed run anyway.
            let _ = self.channel.close().await;
        }
        result
    }
}
