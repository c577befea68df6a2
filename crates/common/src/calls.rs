//! Counting gRPC calls by method and status code: a tower layer under every service of a
//! server, which sees each call's status where gRPC puts it (the response headers of a
//! trailers-only answer, else the trailers at the end of the body) and a call the client
//! dropped before the end as `CANCELLED`.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http_body::{Body, Frame, SizeHint};
use tonic::Code;

/// Called once per finished call with its service (`fleetsync.sync.v1.SyncAgent`), method
/// (`Sync`) and status. Paths of services not in the known list, and methods a service does
/// not have (`UNIMPLEMENTED`), are reported as service and method `unknown`, so that a client
/// cannot make up label values.
pub type CallSink = Arc<dyn Fn(&str, &str, Code) + Send + Sync>;

/// The layer; without a sink it passes everything through untouched.
#[derive(Clone, Default)]
pub struct CallCounter {
    sink: Option<(CallSink, Arc<[&'static str]>)>,
}

impl std::fmt::Debug for CallCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallCounter")
            .field("counting", &self.sink.is_some())
            .finish()
    }
}

impl CallCounter {
    /// Counts calls to the `services` named (fully qualified) into `sink`.
    pub fn new(services: &[&'static str], sink: CallSink) -> Self {
        Self {
            sink: Some((sink, services.into())),
        }
    }
}

impl<S> tower_layer::Layer<S> for CallCounter {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Counted {
            inner,
            sink: self.sink.clone(),
        }
    }
}

/// A service whose calls are counted.
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    sink: Option<(CallSink, Arc<[&'static str]>)>,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for Counted<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Body + Unpin,
{
    type Response = http::Response<CountedBody<R>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let pending = self.sink.as_ref().map(|(sink, known)| {
            let (service, method) = split_path(request.uri().path(), known);
            Pending {
                sink: Arc::clone(sink),
                service,
                method,
            }
        });
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            let mut pending = pending;
            if let Some(code) = status_of(response.headers()) {
                // Trailers-only: the status is in the headers, the body is empty.
                if let Some(pending) = pending.take() {
                    pending.finish(code);
                }
            }
            Ok(response.map(|inner| CountedBody { inner, pending }))
        })
    }
}

/// `/pkg.Service/Method` split into service and method, or `unknown` for both.
fn split_path(path: &str, known: &[&'static str]) -> (&'static str, String) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let valid = !method.is_empty()
        && method.len() <= 64
        && method
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    match known.iter().find(|k| **k == service) {
        Some(known) if valid => (known, method.to_owned()),
        _ => ("unknown", "unknown".to_owned()),
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(Code::from_i32(value.parse().ok()?))
}

/// A call not yet counted.
struct Pending {
    sink: CallSink,
    service: &'static str,
    method: String,
}

impl Pending {
    fn finish(self, code: Code) {
        // A method the service does not have: its name came from the client.
        if code == Code::Unimplemented {
            (self.sink)("unknown", "unknown", code);
        } else {
            (self.sink)(self.service, &self.method, code);
        }
    }
}

/// A response body that counts its call when the trailers pass, or on drop (`CANCELLED`).
pub struct CountedBody<B> {
    inner: B,
    pending: Option<Pending>,
}

impl<B> Drop for CountedBody<B> {
    fn drop(&mut self) {
        if let Some(pending) = self.pending.take() {
            pending.finish(Code::Cancelled);
        }
    }
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_of)
                    && let Some(pending) = self.pending.take()
                {
                    pending.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(pending) = self.pending.take() {
                    pending.finish(Code::Internal);
                }
            }
            Poll::Ready(None) => {
                // The body ended without a status: the stream was cut.
                if let Some(pending) = self.pending.take() {
                    pending.finish(Code::Unknown);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The canonical name of a status code, as gRPC documents it (`NOT_FOUND`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_of_unknown_services_and_odd_methods_are_unknown() {
        let known = ["fleetsync.sync.v1.SyncAgent"];
        assert_eq!(
            split_path("/fleetsync.sync.v1.SyncAgent/StartSync", &known),
            ("fleetsync.sync.v1.SyncAgent", "StartSync".to_owned())
        );
        for path in [
            "/evil.Service/Method",
            "/fleetsync.sync.v1.SyncAgent/",
            "/fleetsync.sync.v1.SyncAgent/a b",
            "/fleetsync.sync.v1.SyncAgent/x/y",
            "/",
        ] {
            assert_eq!(
                split_path(path, &known),
                ("unknown", "unknown".to_owned()),
                "{path}"
            );
        }
    }

    #[test]
    fn code_names_are_canonical() {
        assert_eq!(code_name(Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(Code::from_i32(8)), "RESOURCE_EXHAUSTED");
    }
}
