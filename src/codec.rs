//! The protobuf codec of the generated gRPC code, with small per-call buffers, and the daemon's
//! hand-written hot messages.
//!
//! tonic allocates its buffers eagerly for every call (8 KiB each by default). batchd serves
//! thousands of mostly idle calls, so it starts small and lets a buffer grow with the message.
//! [`wire`] holds the messages of `Process` and `RunBatch` as the daemon decodes and encodes them:
//! ids and names are [`Text`]s, short ones inline (no allocation per job).

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

mod text;
pub mod wire;

pub use text::{NotUtf8, Text};

/// Initial size of a call's encode and decode buffers.
pub const BUFFER_SIZE: usize = 512;
/// Encoded bytes after which a response stream yields to the transport (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// `tonic_prost::ProstCodec` with [`BUFFER_SIZE`] buffers.
#[derive(Debug)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }
}
