//! The tar entries that describe the next entry (PAX `x` and `g`, GNU long names `L` and long
//! links `K`), read here rather than by the tar crate, which reads them whole into memory at
//! whatever size their header claims: a 1 MiB gzip layer claiming a 1 GiB PAX header took
//! berthd's memory. Each is refused above `MAX_HEADER_BYTES` before a byte of it is read.

use std::io::Read;

/// The most an extension entry may hold (Go's archive/tar, and so containerd and CRI-O,
/// refuse more than this too).
pub const MAX_HEADER_BYTES: u64 = 1 << 20;

/// PAX keys berth takes from an `x` entry.
const PAX_PATH: &str = "path";
const PAX_LINKPATH: &str = "linkpath";
const PAX_SIZE: &str = "size";

/// Why an extension entry was refused; the unpacker turns it into its own error.
#[derive(Debug)]
pub(super) enum HeaderError {
    /// It claims more than `MAX_HEADER_BYTES`.
    TooLarge {
        /// The extension entry's own name.
        entry: String,
        /// The claim.
        why: String,
    },
    /// Malformed (two of one kind for one entry).
    Rejected {
        /// The extension entry's own name.
        entry: String,
        /// Why.
        why: String,
    },
    /// Reading it failed.
    Read(std::io::Error),
}

/// What extension entries said about the entry that follows them.
#[derive(Debug, Default)]
pub(super) struct Extensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

impl Extensions {
    /// Whether `kind` is an extension entry (handled by `take`).
    pub(super) fn is_extension(kind: tar::EntryType) -> bool {
        matches!(
            kind,
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        )
    }

    /// Reads one extension entry, bounded. A global PAX header is checked and skipped: it
    /// describes nothing berth keeps.
    pub(super) fn take<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), HeaderError> {
        let kind = entry.header().entry_type();
        let size = entry.size();
        let shown = String::from_utf8_lossy(&entry.header().path_bytes()).into_owned();
        if size > MAX_HEADER_BYTES {
            return Err(HeaderError::TooLarge {
                entry: shown,
                why: format!(
                    "its {kind:?} extension header claims {size} bytes (at most {MAX_HEADER_BYTES})"
                ),
            });
        }
        let slot = match kind {
            tar::EntryType::XGlobalHeader => return Ok(()),
            tar::EntryType::XHeader => &mut self.pax,
            tar::EntryType::GNULongName => &mut self.long_name,
            tar::EntryType::GNULongLink => &mut self.long_link,
            _ => return Ok(()),
        };
        if slot.is_some() {
            return Err(HeaderError::Rejected {
                entry: shown,
                why: format!("two {kind:?} extension headers describe one entry"),
            });
        }
        let mut data = Vec::with_capacity(size as usize);
        entry
            .take(MAX_HEADER_BYTES)
            .read_to_end(&mut data)
            .map_err(HeaderError::Read)?;
        *slot = Some(data);
        Ok(())
    }

    /// Whether any extension waits for an entry.
    pub(super) fn pending(&self) -> bool {
        self.long_name.is_some() || self.long_link.is_some() || self.pax.is_some()
    }

    fn pax_value(&self, key: &str) -> Option<&[u8]> {
        let pax = self.pax.as_deref()?;
        tar::PaxExtensions::new(pax)
            .filter_map(|e| e.ok())
            .filter(|e| e.key() == Ok(key))
            .last()
            .map(|e| e.value_bytes())
    }

    /// The PAX records (key, value) for the entry, in order.
    pub(super) fn pax_records(&self) -> Vec<(&str, &[u8])> {
        let Some(pax) = self.pax.as_deref() else {
            return Vec::new();
        };
        tar::PaxExtensions::new(pax)
            .filter_map(|e| e.ok())
            .filter_map(|e| Some((e.key().ok()?, e.value_bytes())))
            .collect()
    }

    /// The entry's path: a GNU long name, else PAX `path`, else the header's.
    pub(super) fn path<R: Read>(&self, entry: &tar::Entry<'_, R>) -> Vec<u8> {
        if let Some(n) = &self.long_name {
            return trim_nul(n).to_vec();
        }
        if let Some(p) = self.pax_value(PAX_PATH) {
            return p.to_vec();
        }
        entry.header().path_bytes().into_owned()
    }

    /// The entry's link target: a GNU long link, else PAX `linkpath`, else the header's.
    pub(super) fn link<R: Read>(&self, entry: &tar::Entry<'_, R>) -> Option<Vec<u8>> {
        if let Some(n) = &self.long_link {
            return Some(trim_nul(n).to_vec());
        }
        if let Some(p) = self.pax_value(PAX_LINKPATH) {
            return Some(p.to_vec());
        }
        entry.header().link_name_bytes().map(|l| l.into_owned())
    }

    /// A PAX `size` must agree with the header: the tar crate, read entry by entry, takes the
    /// header's size, and two readings of one archive must never differ.
    pub(super) fn check_size<R: Read>(&self, entry: &tar::Entry<'_, R>) -> Result<(), String> {
        let Some(v) = self.pax_value(PAX_SIZE) else {
            return Ok(());
        };
        let pax = std::str::from_utf8(v)
            .ok()
            .and_then(|v| v.parse::<u64>().ok());
        if pax != Some(entry.size()) {
            return Err(format!(
                "its PAX size {:?} disagrees with its header's {}",
                String::from_utf8_lossy(v),
                entry.size()
            ));
        }
        Ok(())
    }
}

fn trim_nul(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    &b[..end]
}
