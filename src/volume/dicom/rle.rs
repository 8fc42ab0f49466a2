//! DICOM's RLE Lossless transfer syntax (PS3.5 annex G): one frame's
//! PackBits segments to little-endian samples, bounded by the fragment's
//! length before anything is reserved.

/// Decodes one RLE Lossless frame (DICOM PS3.5 annex G) to little-endian
/// samples: a 64-byte header of segment count and offsets, then one PackBits
/// segment per byte of the sample, most significant first.
pub fn decode(frag: &[u8], pixels: usize, bytes_per_sample: usize) -> Result<Vec<u8>, String> {
    let word = |i: usize| {
        frag.get(4 * i..4 * i + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let nseg = word(0).ok_or("RLE header is cut short")?;
    if nseg != bytes_per_sample {
        return Err(format!(
            "RLE frame has {nseg} segments; {bytes_per_sample} expected for one greyscale sample"
        ));
    }
    // PackBits turns 2 bytes into at most 128: a fragment too short for the
    // frame is refused before the frame's memory is reserved.
    let max_out = frag.len().saturating_mul(64);
    if pixels.saturating_mul(bytes_per_sample) > max_out {
        return Err(format!(
            "an RLE fragment of {} bytes cannot decode to {pixels} pixels of {bytes_per_sample} byte(s)",
            frag.len()
        ));
    }
    // bounded: the fragment's length times PackBits' expansion, checked above
    let mut out = vec![0u8; pixels * bytes_per_sample];
    for seg in 0..nseg {
        let start = word(1 + seg).ok_or("RLE header is cut short")?;
        let end = if seg + 1 < nseg {
            word(2 + seg).ok_or("RLE header is cut short")?
        } else {
            frag.len()
        };
        let data = frag
            .get(start..end.min(frag.len()))
            .ok_or_else(|| format!("RLE segment {seg} offsets {start}..{end} lie outside the fragment"))?;
        // segment 0 holds the most significant bytes: little-endian position nseg-1
        let pos = nseg - 1 - seg;
        let mut px = 0usize;
        let mut i = 0usize;
        while px < pixels && i < data.len() {
            let n = data[i] as i8;
            i += 1;
            if n >= 0 {
                let run = n as usize + 1;
                let src = data
                    .get(i..i + run)
                    .ok_or_else(|| format!("RLE segment {seg} ends inside a literal run"))?;
                for &v in src.iter().take(pixels - px) {
                    out[px * bytes_per_sample + pos] = v;
                    px += 1;
                }
                i += run;
            } else if n != -128 {
                let run = (1 - i32::from(n)) as usize;
                let v = *data
                    .get(i)
                    .ok_or_else(|| format!("RLE segment {seg} ends inside a repeat run"))?;
                i += 1;
                for _ in 0..run.min(pixels - px) {
                    out[px * bytes_per_sample + pos] = v;
                    px += 1;
                }
            }
        }
        if px < pixels {
            return Err(format!("RLE segment {seg} decodes to {px} of {pixels} pixels"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rle_decodes_packbits_segments_msb_first() {
        // two 16-bit pixels 0x0102, 0x0304; segment 0 (high bytes) as a
        // literal run, segment 1 (low bytes) as literal + repeat of 1.
        let mut frag = vec![0u8; 64];
        frag[0] = 2;
        frag[4] = 64;
        frag[8] = 67;
        frag.extend_from_slice(&[1, 0x01, 0x03]); // literal of 2
        frag.extend_from_slice(&[0, 0x02, 0xFF, 0x04]); // literal of 1, repeat 2 of 0x04 (one used)
        assert_eq!(decode(&frag, 2, 2).unwrap(), vec![0x02, 0x01, 0x04, 0x03]);
        assert!(decode(&frag[..66], 2, 2).is_err());
        assert!(decode(&frag, 2, 1).is_err());
    }
}
