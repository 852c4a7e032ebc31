//! The streamed lists (StreamPodSandboxes, StreamContainers, StreamImages and the stats and
//! metrics streams, kubelet's CRIListStreaming): the same answers as the unary lists, sent in
//! chunks so a node with thousands of items never meets a message size limit.

use std::pin::Pin;

use futures::Stream;
use prost::Message;
use tonic::Status;

/// A streamed list as tonic sends it.
pub(super) type ListStream<R> = Pin<Box<dyn Stream<Item = Result<R, Status>> + Send>>;

/// The most a chunk's items take on the wire: well under gRPC's default 4 MiB receive limit,
/// so a client that never raised it still takes every chunk.
const CHUNK_BYTES: usize = 1 << 20;

/// `items` split into messages of at most CHUNK_BYTES each (an item larger than that goes
/// alone); an empty list is an empty stream, which the client reads as no items.
pub(super) fn chunked<T, R>(items: Vec<T>, wrap: impl Fn(Vec<T>) -> R) -> ListStream<R>
where
    T: Message,
    R: Send + 'static,
{
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for item in items {
        // The field tag and length prefix of a repeated message: at most 1 + 10 bytes.
        let n = item.encoded_len() + 11;
        if !current.is_empty() && size + n > CHUNK_BYTES {
            chunks.push(wrap(std::mem::take(&mut current)));
            size = 0;
        }
        size += n;
        current.push(item);
    }
    if !current.is_empty() {
        chunks.push(wrap(current));
    }
    Box::pin(futures::stream::iter(chunks.into_iter().map(Ok)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cri::v1 as cri;
    use futures::StreamExt;

    fn image(n: usize) -> cri::Image {
        cri::Image {
            id: format!("sha256:{n:064}"),
            repo_tags: vec!["x".repeat(100_000)],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn chunks_keep_every_item_in_order_and_under_the_limit() {
        let items: Vec<_> = (0..35).map(image).collect();
        let chunks: Vec<_> = chunked(items, |images| cri::StreamImagesResponse { images })
            .map(|c| c.unwrap())
            .collect()
            .await;
        assert!(chunks.len() >= 4, "{} chunks", chunks.len());
        assert!(chunks.iter().all(|c| c.encoded_len() <= CHUNK_BYTES));
        let ids: Vec<_> = chunks
            .iter()
            .flat_map(|c| &c.images)
            .map(|i| i.id.clone())
            .collect();
        assert_eq!(ids, (0..35).map(|n| image(n).id).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn an_empty_list_is_an_empty_stream() {
        let n = chunked(Vec::<cri::Image>::new(), |images| {
            cri::StreamImagesResponse { images }
        })
        .count()
        .await;
        assert_eq!(n, 0);
    }
}
