//! A throwaway certificate authority and a server certificate for 127.0.0.1, made with the
//! `openssl` command in a temp dir (nothing is committed).

use std::path::{Path, PathBuf};

use crate::process::run;

/// CA and server certificate files.
#[derive(Debug)]
pub struct TestTls {
    /// The CA certificate (what clients trust).
    pub ca: PathBuf,
    /// The server certificate, signed by the CA, for `127.0.0.1` and `localhost`.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
}

impl TestTls {
    /// Makes a CA and a server certificate in `dir`.
    pub fn create(dir: &Path) -> Self {
        let p = |name: &str| dir.join(name).to_str().expect("utf-8 path").to_owned();
        let (ca_key, ca, key, csr, cert, ext) = (
            p("ca.key"),
            p("ca.pem"),
            p("server.key"),
            p("server.csr"),
            p("server.pem"),
            p("server.ext"),
        );
        run(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &ca_key,
                "-out",
                &ca,
                "-days",
                "2",
                "-subj",
                "/CN=fleetsync test CA",
            ],
        );
        run(
            "openssl",
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                "/CN=localhost",
            ],
        );
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
        )
        .expect("write ext");
        run(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
        Self {
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
        }
    }
}
