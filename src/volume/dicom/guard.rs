//! A length check run before dicom-rs parses a file. dicom-rs allocates an
//! element's declared length before reading it, so one damaged length field
//! (fuzzing found them) makes it allocate and zero gigabytes for a file of
//! a few kilobytes; a folder of such files could take down a whole batch.
//! This walks the element headers (descending into sequences and items,
//! stepping over pixel-data fragments) and refuses any value that claims
//! more bytes than the file has left. It parses nothing else.
use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;

const UNDEFINED: u32 = 0xFFFF_FFFF;

/// What the walk found.
#[derive(Debug, PartialEq)]
pub enum Lengths {
    /// Every declared length fits (or the file is not one this walk reads:
    /// not Part 10, deflated, or cut inside a header; dicom-rs reports those).
    Fit,
    /// The top-level pixel data claim more bytes than remain: the file is
    /// truncated there, its header before it is whole.
    PixelDataTruncated(String),
    /// Some other value claims more bytes than remain.
    Corrupt(String),
}

fn u16_at(b: &[u8], i: usize, le: bool) -> Option<u16> {
    let s: [u8; 2] = b.get(i..i + 2)?.try_into().ok()?;
    Some(if le {
        u16::from_le_bytes(s)
    } else {
        u16::from_be_bytes(s)
    })
}

fn u32_at(b: &[u8], i: usize, le: bool) -> Option<u32> {
    let s: [u8; 4] = b.get(i..i + 4)?.try_into().ok()?;
    Some(if le {
        u32::from_le_bytes(s)
    } else {
        u32::from_be_bytes(s)
    })
}

/// Whether an explicit VR has the 4-byte length form. Like dicom-rs, an
/// unknown VR is read as UN, which has it.
fn long_form(vr: &[u8]) -> bool {
    !matches!(
        vr,
        b"AE"
            | b"AS"
            | b"AT"
            | b"CS"
            | b"DA"
            | b"DS"
            | b"DT"
            | b"FL"
            | b"FD"
            | b"IS"
            | b"LO"
            | b"LT"
            | b"PN"
            | b"SH"
            | b"SL"
            | b"SS"
            | b"ST"
            | b"TM"
            | b"UI"
            | b"UL"
            | b"US"
    )
}

/// The size of one number of a binary numeric VR (1 for the others).
/// dicom-rs reads such a value as `len / width` numbers but counts `len`
/// bytes as read, so a length that is not a multiple leaves the stream
/// misaligned and the next "header" it reads is value bytes, whose length
/// field can ask for gigabytes (fuzzing found one: an SQ turned SV).
fn value_width(vr: &[u8]) -> u32 {
    match vr {
        b"US" | b"SS" | b"OW" => 2,
        b"AT" | b"FL" | b"OF" | b"SL" | b"UL" | b"OL" => 4,
        b"FD" | b"OD" | b"SV" | b"UV" | b"OV" => 8,
        _ => 1,
    }
}

fn is_sequence_in_dictionary(tag: Tag) -> bool {
    StandardDataDictionary
        .by_tag(tag)
        .is_some_and(|e| e.vr() == VirtualVr::Exact(VR::SQ))
}

/// Checks the declared lengths of a Part 10 byte stream.
pub fn check_lengths(b: &[u8]) -> Lengths {
    let mut i = if b.get(128..132) == Some(b"DICM") {
        132
    } else if b.starts_with(b"DICM") {
        4
    } else {
        return Lengths::Fit;
    };
    // File meta group: always explicit VR little endian. dicom-rs reads
    // elements (of any group) until FileMetaInformationGroupLength bytes
    // are consumed, so the data set starts where that count says, not at
    // the first element of another group (fuzzing found a file where the
    // two differ and the data set dicom-rs inflated asked for 3.5 GB).
    let mut ts = String::new();
    let group_length = (u16_at(b, i, true) == Some(0x0002)
        && u16_at(b, i + 2, true) == Some(0x0000)
        && u16_at(b, i + 6, true) == Some(4))
    .then(|| u32_at(b, i + 8, true))
    .flatten();
    let meta_start = i + 12;
    let in_meta = |i: usize| match group_length {
        Some(g) => i < meta_start.saturating_add(g as usize),
        None => u16_at(b, i, true) == Some(0x0002),
    };
    if group_length.is_some() {
        i = meta_start;
    }
    while in_meta(i) {
        let Some(group) = u16_at(b, i, true) else {
            return Lengths::Fit;
        };
        let Some(elem) = u16_at(b, i + 2, true) else {
            return Lengths::Fit;
        };
        let Some(vr) = b.get(i + 4..i + 6) else {
            return Lengths::Fit;
        };
        let (len, hdr) = if long_form(vr) {
            let Some(l) = u32_at(b, i + 8, true) else {
                return Lengths::Fit;
            };
            (l, 12)
        } else {
            let Some(l) = u16_at(b, i + 6, true) else {
                return Lengths::Fit;
            };
            (u32::from(l), 8)
        };
        let start = i + hdr;
        if len == UNDEFINED || len as usize > b.len().saturating_sub(start) {
            return Lengths::Corrupt(format!("file meta element ({group:04X},{elem:04X}) claims {len} bytes"));
        }
        if group == 0x0002 && elem == 0x0010 {
            ts = String::from_utf8_lossy(&b[start..start + len as usize])
                .trim_end_matches(['\0', ' '])
                .to_string();
        }
        i = start + len as usize;
    }
    let (explicit, le) = match ts.as_str() {
        "1.2.840.10008.1.2" => (false, true),
        "1.2.840.10008.1.2.2" => (true, false),
        // deflated data sets: walk what dicom-rs will inflate (fuzzing
        // found a 3 kB file whose inflated lengths asked for 2 GB)
        "1.2.840.10008.1.2.1.99" => {
            use std::io::Read;
            let mut inflated = Vec::new();
            let cap = 1u64 << 30;
            let r = flate2::read::DeflateDecoder::new(&b[i..])
                .take(cap)
                .read_to_end(&mut inflated);
            if r.is_err() || inflated.len() as u64 >= cap {
                return Lengths::Corrupt("the deflated data set does not inflate (or inflates past 1 GiB)".into());
            }
            return walk(&inflated, 0, true, true);
        }
        _ => (true, true),
    };
    walk(b, i, explicit, le)
}

fn walk(b: &[u8], mut i: usize, explicit: bool, le: bool) -> Lengths {
    // End offsets of the open sequences and items (usize::MAX: undefined
    // length, closed by a delimiter); empty at the top level.
    let mut open: Vec<usize> = Vec::new();
    let mut fragments = false;
    loop {
        while open.last().is_some_and(|&end| end != usize::MAX && i >= end) {
            open.pop();
        }
        let (Some(group), Some(elem)) = (u16_at(b, i, le), u16_at(b, i + 2, le)) else {
            return Lengths::Fit;
        };
        let rem = |start: usize| b.len().saturating_sub(start);
        if group == 0xFFFE && matches!(elem, 0xE000 | 0xE00D | 0xE0DD) {
            let Some(len) = u32_at(b, i + 4, le) else {
                return Lengths::Fit;
            };
            i += 8;
            // Outside any sequence dicom-rs reads an item or delimiter of
            // defined length as a value of that length.
            if !fragments && open.is_empty() && len != UNDEFINED {
                if len as usize > rem(i) {
                    return Lengths::Corrupt(format!(
                        "element (FFFE,{elem:04X}) outside a sequence claims {len} bytes, {} remain",
                        rem(i)
                    ));
                }
                i += len as usize;
                continue;
            }
            match elem {
                0xE000 if fragments => {
                    if len == UNDEFINED || len as usize > rem(i) {
                        return Lengths::Corrupt(format!(
                            "a pixel data fragment claims {len} bytes, {} remain",
                            rem(i)
                        ));
                    }
                    i += len as usize;
                }
                0xE000 if len == UNDEFINED => open.push(usize::MAX),
                // An item must fit in the file too; outside a sequence,
                // dicom-rs reads its whole length as one value.
                0xE000 if len as usize > rem(i) => {
                    return Lengths::Corrupt(format!("an item element claims {len} bytes, {} remain", rem(i)));
                }
                0xE000 => open.push(i.saturating_add(len as usize)),
                0xE0DD if fragments => fragments = false,
                _ => {
                    if open.last() == Some(&usize::MAX) {
                        open.pop();
                    }
                }
            }
            continue;
        }
        if group == 0xFFFE {
            // dicom-rs reads every (FFFE,xxxx) header as tag + 4-byte
            // length, with no VR, and the value (if any) as bytes.
            let Some(len) = u32_at(b, i + 4, le) else {
                return Lengths::Fit;
            };
            i += 8;
            if len == UNDEFINED {
                open.push(usize::MAX);
            } else if len as usize > rem(i) {
                return Lengths::Corrupt(format!(
                    "element (FFFE,{elem:04X}) claims {len} bytes, {} remain",
                    rem(i)
                ));
            } else {
                i += len as usize;
            }
            continue;
        }
        let tag = Tag(group, elem);
        let mut width = 1;
        let (len, hdr, sequence) = if explicit {
            let Some(vr) = b.get(i + 4..i + 6) else {
                return Lengths::Fit;
            };
            width = value_width(vr);
            if long_form(vr) {
                let Some(l) = u32_at(b, i + 8, le) else {
                    return Lengths::Fit;
                };
                (l, 12, vr == b"SQ" || (vr == b"UN" && l == UNDEFINED))
            } else {
                let Some(l) = u16_at(b, i + 6, le) else {
                    return Lengths::Fit;
                };
                (u32::from(l), 8, false)
            }
        } else {
            let Some(l) = u32_at(b, i + 4, le) else {
                return Lengths::Fit;
            };
            if let Some(VirtualVr::Exact(vr)) = StandardDataDictionary.by_tag(tag).map(|e| e.vr()) {
                width = value_width(vr.to_string().as_bytes());
            }
            (l, 8, is_sequence_in_dictionary(tag))
        };
        i += hdr;
        let pixel_data = tag == Tag(0x7FE0, 0x0010);
        if len == UNDEFINED {
            if pixel_data {
                fragments = true;
            } else {
                open.push(usize::MAX);
            }
            continue;
        }
        if sequence {
            open.push(i.saturating_add(len as usize));
            if len as usize > rem(i) {
                return Lengths::Corrupt(format!(
                    "sequence ({group:04X},{elem:04X}) claims {len} bytes, {} remain",
                    rem(i)
                ));
            }
            continue;
        }
        if len % width != 0 && !pixel_data {
            return Lengths::Corrupt(format!(
                "element ({group:04X},{elem:04X}) holds {width}-byte numbers but has length {len}"
            ));
        }
        if len as usize > rem(i) {
            let msg = format!("element ({group:04X},{elem:04X}) claims {len} bytes, {} remain", rem(i));
            return if pixel_data && open.is_empty() {
                Lengths::PixelDataTruncated(msg)
            } else {
                Lengths::Corrupt(msg)
            };
        }
        i += len as usize;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explicit_le(elements: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 128];
        b.extend_from_slice(b"DICM");
        let ts = b"1.2.840.10008.1.2.1\0";
        b.extend_from_slice(&[0x02, 0x00, 0x10, 0x00, b'U', b'I']);
        b.extend_from_slice(&(ts.len() as u16).to_le_bytes());
        b.extend_from_slice(ts);
        b.extend_from_slice(elements);
        b
    }

    #[test]
    fn finds_lengths_past_the_end() {
        // (0010,0010) PN "AB", then (0008,0060) CS claiming 4000 bytes
        let ok = [0x10, 0x00, 0x10, 0x00, b'P', b'N', 2, 0, b'A', b'B'];
        assert_eq!(check_lengths(&explicit_le(&ok)), Lengths::Fit);
        let mut bad = ok.to_vec();
        bad.extend_from_slice(&[0x08, 0x00, 0x60, 0x00, b'O', b'B', 0, 0, 0xA0, 0x0F, 0, 0, 1, 2]);
        assert!(matches!(check_lengths(&explicit_le(&bad)), Lengths::Corrupt(_)));
        // pixel data cut short at the top level: truncated, not corrupt
        let mut px = ok.to_vec();
        px.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0, 0x00, 0x10, 0, 0, 1, 2, 3, 4]);
        assert!(matches!(
            check_lengths(&explicit_le(&px)),
            Lengths::PixelDataTruncated(_)
        ));
    }

    #[test]
    fn finds_numeric_values_of_a_length_dicom_rs_would_misread() {
        // (0018,0088) DS "1", then (0020,9116) as SV with 12 bytes (1.5 numbers)
        let ok = [0x18, 0x00, 0x88, 0x00, b'D', b'S', 2, 0, b'1', b' '];
        let mut bad = ok.to_vec();
        bad.extend_from_slice(&[0x20, 0x00, 0x16, 0x91, b'S', b'V', 0, 0, 12, 0, 0, 0]);
        bad.extend_from_slice(&[0u8; 12]);
        let Lengths::Corrupt(why) = check_lengths(&explicit_le(&bad)) else {
            panic!("misaligned SV accepted");
        };
        assert!(
            why.contains("(0020,9116) holds 8-byte numbers but has length 12"),
            "{why}"
        );
        bad.truncate(bad.len() - 12);
        bad[ok.len() + 8] = 16;
        bad.extend_from_slice(&[0u8; 16]);
        assert_eq!(check_lengths(&explicit_le(&bad)), Lengths::Fit);
    }

    #[test]
    fn descends_into_sequences_and_items() {
        // (0008,1115) SQ undefined, item undefined, (0008,1150) UI claiming 9999, delimiters
        let mut e = vec![0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF];
        e.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        e.extend_from_slice(&[0x08, 0x00, 0x50, 0x11, b'U', b'I', 0x0F, 0x27, b'1', b'2']);
        assert!(matches!(check_lengths(&explicit_le(&e)), Lengths::Corrupt(_)));
    }
}
