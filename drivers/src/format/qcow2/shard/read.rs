//! Reads and block status: the mapping of the top layer, then the backing chain.

use super::*;

impl Shard {
    pub(crate) async fn read(&self, off: u64, segs: &[IoSeg<'_>]) -> Result<(), IoError> {
        let r = loop {
            match read_chain(self.chain(), 0, off, segs).await {
                Err(IoError::Os(libc::EAGAIN)) => self.flush_now(false).await?,
                r => break r,
            }
        };
        self.signal_if_corrupt(r).await
    }

    pub(crate) async fn block_status(
        &self,
        off: u64,
        len: u64,
    ) -> Result<(u64, bool, bool, u8), IoError> {
        let run = self.map_top(off, len).await?;
        Ok(match run.kind {
            RunKind::Data { .. } | RunKind::Compressed { .. } => (run.len, true, false, 1),
            RunKind::Zero { .. } => (run.len, false, true, 1),
            RunKind::Unallocated if self.chain().len() > 1 => {
                status_chain(self.chain(), 1, off, run.len).await?
            }
            RunKind::Unallocated => (run.len, false, true, 0),
        })
    }
}
