//! Aspect-ratio buckets and the image preparation that fills them.
//!
//! An image of w×h pixels is scaled to an area of about resolution² keeping its aspect ratio, but never
//! above its own size (upscaling invents detail the model then learns as real); each side is then floored
//! to a multiple of the bucket step, which gives the bucket. The image is resized to cover the bucket
//! (aspect kept, so at most one step is cut from a side) and the remainder is cropped evenly from both
//! ends. Flooring to a coarse step rather than to 16 is what makes buckets: at 1024 with the default step
//! of 64, every photo lands in one of a few dozen sizes, so micro-batches of several items form, and a
//! bucket side is still a multiple of 16 (the VAE's 8× times the transformer's 2×2 patches).
//!
//! An image is too small when its shorter side is under `min_side` (default resolution/4: 256 px at 1024),
//! or when the bucket would lose a side (a panorama so long that its short side, scaled to the target area,
//! is under one step). Either way the run reports it rather than training on a thumbnail.

use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

/// Every bucket side is a multiple of this: the VAE downsamples 8× and the transformer's patches are 2×2.
pub const ALIGN: u32 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketSpec {
    pub resolution: u32,
    pub step: u32,
    pub min_side: u32,
}

/// How an image of a given size becomes its bucket: resize to `resized`, then crop `bucket` from
/// `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fit {
    /// (width, height) in pixels.
    pub bucket: (u32, u32),
    pub resized: (u32, u32),
    pub offset: (u32, u32),
}

impl BucketSpec {
    /// `step` defaults to resolution/16 floored to a multiple of 16 (64 at 1024) and `min_side` to
    /// resolution/4.
    pub fn new(resolution: u32, step: Option<u32>, min_side: Option<u32>) -> Result<BucketSpec, String> {
        let step = step.unwrap_or((resolution / 16 / ALIGN * ALIGN).max(ALIGN));
        if step == 0 || !step.is_multiple_of(ALIGN) || step > resolution {
            return Err(format!(
                "resolution {resolution} and bucket step {step}: the step must be a positive multiple of {ALIGN} \
                 and at most the resolution"
            ));
        }
        Ok(BucketSpec { resolution, step, min_side: min_side.unwrap_or(resolution / 4) })
    }

    /// The bucket and resize of a `width`×`height` image, or why the image is too small.
    pub fn fit(&self, width: u32, height: u32) -> Result<Fit, String> {
        let short = width.min(height);
        if short < self.min_side {
            return Err(format!(
                "too small: {width}x{height} px, the shorter side is under the minimum of {} px",
                self.min_side
            ));
        }
        let (w, h) = (f64::from(width), f64::from(height));
        let scale = (f64::from(self.resolution) / (w * h).sqrt()).min(1.0);
        // The epsilon keeps a side that lands exactly on a step (up to rounding) on that step.
        let side = |s: f64, limit: u32| ((s * scale + 1e-6) as u32).min(limit) / self.step * self.step;
        let bucket = (side(w, width), side(h, height));
        if bucket.0 == 0 || bucket.1 == 0 {
            return Err(format!(
                "too small: {width}x{height} px is so elongated that at about {0}x{0} px its shorter side is under \
                 the bucket step of {1} px",
                self.resolution, self.step
            ));
        }
        let r = (f64::from(bucket.0) / w).max(f64::from(bucket.1) / h);
        let resized = (((w * r).round() as u32).max(bucket.0), ((h * r).round() as u32).max(bucket.1));
        let offset = ((resized.0 - bucket.0) / 2, (resized.1 - bucket.1) / 2);
        Ok(Fit { bucket, resized, offset })
    }
}

/// An image as the VAE takes it: RGB, channels first, in [-1, 1].
#[derive(Debug, Clone)]
pub struct Pixels {
    /// [3, height, width], row-major.
    pub data: Vec<f32>,
    pub width: u32,
    pub height: u32,
}

/// Decodes an image file's bytes with its EXIF orientation applied: the size the image is seen at.
pub fn decode(bytes: &[u8]) -> Result<RgbImage, String> {
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("unreadable image: {e}"))?;
    let mut decoder = reader.into_decoder().map_err(|e| format!("unreadable image: {e}"))?;
    let orientation = decoder.orientation().map_err(|e| format!("unreadable image: {e}"))?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| format!("corrupt image: {e}"))?;
    image.apply_orientation(orientation);
    Ok(image.into_rgb8())
}

/// The pixel size of an image file from its header alone (before orientation, which only swaps the sides).
pub fn dimensions(bytes: &[u8]) -> Result<(u32, u32), String> {
    ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?
        .into_dimensions()
        .map_err(|e| format!("unreadable image: {e}"))
}

/// Resizes (Lanczos, like PIL's LANCZOS that diffusers' scripts use) and crops `image` into its bucket.
pub fn prepare(image: &RgbImage, spec: &BucketSpec) -> Result<Pixels, String> {
    let fit = spec.fit(image.width(), image.height())?;
    let resized = if fit.resized == image.dimensions() {
        image.clone()
    } else {
        image::imageops::resize(image, fit.resized.0, fit.resized.1, FilterType::Lanczos3)
    };
    let (width, height) = fit.bucket;
    let cropped = image::imageops::crop_imm(&resized, fit.offset.0, fit.offset.1, width, height).to_image();
    let plane = (width * height) as usize;
    let mut data = vec![0f32; 3 * plane];
    for (i, pixel) in cropped.pixels().enumerate() {
        for (c, &v) in pixel.0.iter().enumerate() {
            data[c * plane + i] = f32::from(v) / 127.5 - 1.0;
        }
    }
    Ok(Pixels { data, width, height })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BucketSpec {
        BucketSpec::new(1024, None, None).unwrap()
    }

    #[test]
    fn defaults_follow_the_resolution() {
        assert_eq!(spec(), BucketSpec { resolution: 1024, step: 64, min_side: 256 });
        assert_eq!(BucketSpec::new(512, None, None).unwrap(), BucketSpec { resolution: 512, step: 32, min_side: 128 });
        assert_eq!(BucketSpec::new(128, None, Some(8)).unwrap(), BucketSpec { resolution: 128, step: 16, min_side: 8 });
        assert!(BucketSpec::new(1024, Some(24), None).is_err());
        assert!(BucketSpec::new(8, None, None).is_err());
        assert!(BucketSpec::new(128, Some(256), None).is_err());
    }

    #[test]
    fn known_buckets() {
        let s = spec();
        let fit = |w, h| s.fit(w, h).unwrap();
        // Square and at the target area: unchanged.
        assert_eq!(fit(1024, 1024), Fit { bucket: (1024, 1024), resized: (1024, 1024), offset: (0, 0) });
        // 4:3 at twice the area: scale 0.577 gives 1182x887, floored to 1152x832; covering it takes 1152x864
        // and 16 rows are cut, 8 from each end.
        assert_eq!(fit(2048, 1536), Fit { bucket: (1152, 832), resized: (1152, 864), offset: (0, 16) });
        // The same image in portrait: the transposed answer.
        assert_eq!(fit(1536, 2048), Fit { bucket: (832, 1152), resized: (864, 1152), offset: (16, 0) });
        // Smaller than the target area: never upscaled, only floored to the step.
        assert_eq!(fit(500, 300), Fit { bucket: (448, 256), resized: (448, 269), offset: (0, 6) });
        assert_eq!(fit(640, 512), Fit { bucket: (640, 512), resized: (640, 512), offset: (0, 0) });
        // A wide panorama still keeps its aspect ratio within a step.
        assert_eq!(fit(4000, 1000).bucket, (2048, 512));
    }

    #[test]
    fn too_small_images_say_why() {
        let s = spec();
        assert!(s.fit(255, 4000).unwrap_err().contains("255x4000 px, the shorter side is under the minimum of 256"));
        assert!(s.fit(256, 256).is_ok());
        let panorama = s.fit(200_000, 300).unwrap_err();
        assert!(panorama.contains("so elongated"), "{panorama}");
    }

    /// Over a grid of sizes and settings: sides are multiples of 16 (and of the step), nothing is upscaled,
    /// the area stays within the target, the resize covers the bucket, the crop is centred, and the aspect
    /// ratio moves by at most one step.
    #[test]
    fn bucket_invariants() {
        for (resolution, step) in [(1024, None), (1024, Some(16)), (512, None), (128, Some(16))] {
            let s = BucketSpec::new(resolution, step, Some(16)).unwrap();
            for w in (16..3000).step_by(37) {
                for h in (16..3000).step_by(41) {
                    let Ok(f) = s.fit(w, h) else { continue };
                    let (bw, bh) = f.bucket;
                    assert!(bw % ALIGN == 0 && bh % ALIGN == 0 && bw % s.step == 0 && bh % s.step == 0);
                    assert!(bw <= w && bh <= h, "upscaled {w}x{h} to {bw}x{bh}");
                    assert!(u64::from(bw) * u64::from(bh) <= u64::from(resolution).pow(2));
                    assert!(f.resized.0 >= bw && f.resized.1 >= bh && f.resized.0 <= w && f.resized.1 <= h);
                    assert!(f.resized.0 == bw || f.resized.1 == bh, "{w}x{h}: {f:?} crops both sides");
                    assert_eq!(f.offset, ((f.resized.0 - bw) / 2, (f.resized.1 - bh) / 2));
                    let (aspect, kept) = (f64::from(w) / f64::from(h), f64::from(bw) / f64::from(bh));
                    let slack = f64::from(s.step) / f64::from(bw.min(bh)) + 1e-9;
                    assert!((kept / aspect).ln().abs() <= (1.0 + slack).ln() + 0.01, "{w}x{h} -> {bw}x{bh}");
                    assert_eq!(s.fit(h, w).unwrap().bucket, (bh, bw), "transposing {w}x{h}");
                }
            }
        }
    }

    #[test]
    fn prepare_crops_the_centre_and_scales_to_plus_minus_one() {
        // A 700x300 image: left and right thirds black, the middle white, rows all alike. At 256 with step
        // 16 it is scaled by 0.559 to 391x168, floored to 384x160, resized to 384x165 and cropped 2 rows
        // off the top: the columns keep their colours and the middle stays white.
        let image =
            RgbImage::from_fn(700, 300, |x, _| if (233..467).contains(&x) { [255; 3].into() } else { [0; 3].into() });
        let s = BucketSpec::new(256, Some(16), Some(64)).unwrap();
        assert_eq!(s.fit(700, 300).unwrap(), Fit { bucket: (384, 160), resized: (384, 165), offset: (0, 2) });
        let p = prepare(&image, &s).unwrap();
        assert_eq!((p.width, p.height, p.data.len()), (384, 160, 3 * 384 * 160));
        let at = |c: usize, y: usize, x: usize| p.data[(c * 160 + y) * 384 + x];
        assert_eq!((at(0, 0, 0), at(1, 70, 192), at(2, 159, 383)), (-1.0, 1.0, -1.0));
        assert!(p.data.iter().all(|v| (-1.0..=1.0).contains(v)));
    }

    #[test]
    fn decode_applies_exif_orientation() {
        // A 4x2 JPEG tagged "rotate 90° clockwise" is seen as 2x4.
        let mut jpeg = Vec::new();
        let image = RgbImage::from_pixel(4, 2, [200, 10, 10].into());
        image::codecs::jpeg::JpegEncoder::new(&mut jpeg).encode_image(&image).unwrap();
        assert_eq!(decode(&jpeg).unwrap().dimensions(), (4, 2));
        // Splice an APP1 Exif segment with Orientation = 6 right after the SOI marker.
        let tiff: &[u8] = &[
            b'M', b'M', 0, 42, 0, 0, 0, 8, // big-endian TIFF header, first IFD at 8
            0, 1, // one entry
            0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, // Orientation, SHORT, count 1, value 6
            0, 0, 0, 0, // no next IFD
        ];
        let mut app1 = vec![0xFF, 0xE1];
        app1.extend_from_slice(&((2 + 6 + tiff.len()) as u16).to_be_bytes());
        app1.extend_from_slice(b"Exif\0\0");
        app1.extend_from_slice(tiff);
        let rotated: Vec<u8> = [&jpeg[..2], &app1, &jpeg[2..]].concat();
        assert_eq!(decode(&rotated).unwrap().dimensions(), (2, 4));
        assert_eq!(dimensions(&rotated).unwrap(), (4, 2));
        assert!(decode(&rotated[..rotated.len() / 2]).unwrap_err().contains("image"));
        assert!(decode(b"not an image").unwrap_err().starts_with("unreadable image"));
    }
}
