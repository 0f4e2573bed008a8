//! Handlers: user code for one task or event type, and their type-erased
//! form the worker dispatches to.

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::context::Context;
use crate::error::TaskError;

/// Handles messages of type `M`. Any `async` closure or fn
/// `Fn(M, Context) -> impl Future<Output = Result<O, TaskError>>` is one.
#[async_trait::async_trait]
pub trait Handler<M>: Send + Sync + 'static {
    type Output;
    async fn handle(&self, message: M, ctx: Context) -> Result<Self::Output, TaskError>;
}

#[async_trait::async_trait]
impl<M, F, Fut, O> Handler<M> for F
where
    M: Send + 'static,
    F: Fn(M, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
{
    type Output = O;
    async fn handle(&self, message: M, ctx: Context) -> Result<O, TaskError> {
        (self)(message, ctx).await
    }
}

/// Why a body could not become a message: never worth a retry.
pub(crate) struct DecodeError(pub String);

/// A handler behind JSON: bytes in, the output as JSON out.
pub(crate) type ErasedHandler = Arc<
    dyn Fn(
            &[u8],
            Context,
        ) -> Result<BoxFuture<'static, Result<serde_json::Value, TaskError>>, DecodeError>
        + Send
        + Sync,
>;

pub(crate) fn erase<M, H>(handler: H) -> ErasedHandler
where
    M: DeserializeOwned + Send + 'static,
    H: Handler<M>,
    H::Output: Serialize,
{
    let handler = Arc::new(handler);
    Arc::new(move |body: &[u8], ctx: Context| {
        let message: M = serde_json::from_slice(body).map_err(|e| DecodeError(e.to_string()))?;
        let handler = handler.clone();
        Ok(Box::pin(async move {
            let output = handler.handle(message, ctx).await?;
            serde_json::to_value(output).map_err(|e| TaskError::Fatal(Box::new(e)))
        }) as BoxFuture<'static, _>)
    })
}

/// A batch handler: many messages in, one outcome for all. `check` finds
/// the bodies that cannot be decoded (dead-lettered alone, not with the
/// batch); `run` gets the rest.
#[derive(Clone)]
pub(crate) struct ErasedBatchHandler {
    pub check: Arc<BodyCheck>,
    pub run: Arc<BatchRun>,
}

type BodyCheck = dyn Fn(&[u8]) -> Result<(), DecodeError> + Send + Sync;
type BatchRun =
    dyn Fn(Vec<&[u8]>, Vec<Context>) -> BoxFuture<'static, Result<(), TaskError>> + Send + Sync;

pub(crate) fn erase_batch<M, F, Fut>(handler: F) -> ErasedBatchHandler
where
    M: DeserializeOwned + Send + 'static,
    F: Fn(Vec<M>, Vec<Context>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), TaskError>> + Send + 'static,
{
    let handler = Arc::new(handler);
    ErasedBatchHandler {
        check: Arc::new(|body: &[u8]| {
            serde_json::from_slice::<M>(body)
                .map(drop)
                .map_err(|e| DecodeError(e.to_string()))
        }),
        run: Arc::new(move |bodies: Vec<&[u8]>, ctxs: Vec<Context>| {
            let decoded = bodies
                .into_iter()
                .map(serde_json::from_slice)
                .collect::<Result<Vec<M>, _>>();
            match decoded {
                Ok(messages) => Box::pin(handler(messages, ctxs)) as BoxFuture<'static, _>,
                Err(e) => Box::pin(async move { Err(TaskError::Fatal(Box::new(e))) }),
            }
        }),
    }
}
