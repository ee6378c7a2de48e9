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
//!
//! Everything above is decided from the file's header ([`plan`]) before a pixel is decoded, so a file that
//! declares more pixels than the limit (a 74-byte PNG can declare 100000x100000) is refused rather than
//! allocated, and decoding runs under the image crate's [`Limits`] as well. A JPEG much larger than its bucket
//! is decoded at 1/2, 1/4 or 1/8 of its size in the DCT, the smallest that still covers the resize, so a
//! 20000x20000 photo costs a 2500x2500 decode.

use image::imageops::FilterType;
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};
use jpeg_decoder::PixelFormat;

/// Every bucket side is a multiple of this: the VAE downsamples 8× and the transformer's patches are 2×2.
pub const ALIGN: u32 = 16;

/// The most pixels `acrf cache` decodes of one image unless told otherwise (`--max-pixels`): 8192², 64 M.
pub const DEFAULT_MAX_PIXELS: u64 = 8192 * 8192;

/// The largest decoded pixel, RGBA at 16 bits per channel: what the allocation limit allows per pixel.
const MAX_BYTES_PER_PIXEL: u64 = 8;

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

/// Why an image is left out of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unfit {
    #[error("too small: {width}x{height} px, the shorter side is under the minimum of {min_side} px")]
    TooSmall { width: u32, height: u32, min_side: u32 },
    #[error(
        "too small: {width}x{height} px is so elongated that at about {resolution}x{resolution} px its shorter side \
         is under the bucket step of {step} px"
    )]
    Elongated { width: u32, height: u32, resolution: u32, step: u32 },
    #[error(
        "too large to decode: {width}x{height} px{} is {} pixels, over the limit of {max_pixels} (--max-pixels)",
        reduced_to(*width, *height, *decoded),
        u64::from(decoded.0) * u64::from(decoded.1)
    )]
    TooLarge { width: u32, height: u32, decoded: (u32, u32), max_pixels: u64 },
    #[error("{0}")]
    Unreadable(String),
}

fn reduced_to(width: u32, height: u32, decoded: (u32, u32)) -> String {
    if decoded == (width, height) {
        String::new()
    } else {
        format!(", decoded at reduced size as {}x{} px,", decoded.0, decoded.1)
    }
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
    pub fn fit(&self, width: u32, height: u32) -> Result<Fit, Unfit> {
        let short = width.min(height);
        if short < self.min_side {
            return Err(Unfit::TooSmall { width, height, min_side: self.min_side });
        }
        let (w, h) = (f64::from(width), f64::from(height));
        let scale = (f64::from(self.resolution) / (w * h).sqrt()).min(1.0);
        // The epsilon keeps a side that lands exactly on a step (up to rounding) on that step.
        let side = |s: f64, limit: u32| ((s * scale + 1e-6) as u32).min(limit) / self.step * self.step;
        let bucket = (side(w, width), side(h, height));
        if bucket.0 == 0 || bucket.1 == 0 {
            return Err(Unfit::Elongated { width, height, resolution: self.resolution, step: self.step });
        }
        let r = (f64::from(bucket.0) / w).max(f64::from(bucket.1) / h);
        let resized = (((w * r).round() as u32).max(bucket.0), ((h * r).round() as u32).max(bucket.1));
        let offset = ((resized.0 - bucket.0) / 2, (resized.1 - bucket.1) / 2);
        Ok(Fit { bucket, resized, offset })
    }

    /// The advice for images skipped as too small, whose shorter sides are `short_sides`: the `--resolution`
    /// (when `min_side` is its default quarter of it) or the `--min-side` that takes them all in.
    pub fn too_small_advice(&self, short_sides: &[u32]) -> Option<String> {
        let smallest = *short_sides.iter().min()?;
        let resolution = (smallest * 4 / ALIGN * ALIGN).max(ALIGN);
        let flags = if self.min_side == self.resolution / 4 {
            format!("--resolution {resolution} or --min-side {smallest}")
        } else {
            format!("--min-side {smallest}")
        };
        Some(format!(
            "{} image(s) have a shorter side under the minimum of {} px at --resolution {} (the smallest is {smallest} \
             px); pass {flags} to cache them too",
            short_sides.len(),
            self.min_side,
            self.resolution
        ))
    }
}

/// How an image file becomes its bucket, decided from its header before any pixel is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub fit: Fit,
    /// For a JPEG decoded at reduced size, the size asked of the DCT scaling (before orientation).
    jpeg_scaled: Option<(u16, u16)>,
}

/// The image crate's decoder of `bytes` under limits that allow `max_pixels` and no more; `sides` limits each
/// side to that too, for a decoder that decodes (a header read only for its size must pass a bomb's, so that
/// [`plan`] can name it).
fn decoder(bytes: &[u8], max_pixels: u64, sides: bool) -> Result<(impl ImageDecoder + '_, Limits), Unfit> {
    let unreadable = |e: &dyn std::fmt::Display| Unfit::Unreadable(format!("unreadable image: {e}"));
    let mut reader = ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| unreadable(&e))?;
    let mut limits = Limits::default();
    if sides {
        let side = u32::try_from(max_pixels).unwrap_or(u32::MAX);
        limits.max_image_width = Some(side);
        limits.max_image_height = Some(side);
    }
    limits.max_alloc = Some(max_pixels.saturating_mul(MAX_BYTES_PER_PIXEL));
    reader.limits(limits.clone());
    Ok((reader.into_decoder().map_err(|e| unreadable(&e))?, limits))
}

/// Whether `orientation` turns the image on its side.
fn swaps_sides(orientation: Orientation) -> bool {
    use Orientation::*;
    matches!(orientation, Rotate90 | Rotate270 | Rotate90FlipH | Rotate270FlipH)
}

/// Reads the header of an image file and decides its bucket and how it is decoded: refused when too small,
/// or when decoding it would take more than `max_pixels`.
pub fn plan(bytes: &[u8], spec: &BucketSpec, max_pixels: u64) -> Result<Plan, Unfit> {
    let (mut decoder, _) = decoder(bytes, max_pixels, false)?;
    let (width, height) = decoder.dimensions();
    let orientation = decoder.orientation().map_err(|e| Unfit::Unreadable(format!("unreadable image: {e}")))?;
    let swapped = swaps_sides(orientation);
    let fit = if swapped { spec.fit(height, width)? } else { spec.fit(width, height)? };
    let covers = if swapped { (fit.resized.1, fit.resized.0) } else { fit.resized };
    let scaled = jpeg_scaled(bytes, (width, height), covers);
    let decoded = scaled.map_or((width, height), |(_, size)| size);
    if u64::from(decoded.0) * u64::from(decoded.1) > max_pixels {
        return Err(Unfit::TooLarge { width, height, decoded, max_pixels });
    }
    Ok(Plan { fit, jpeg_scaled: scaled.map(|(asked, _)| asked) })
}

/// For a JPEG of `full` size that its DCT scaling can decode at a smaller size still covering `covers` on both
/// sides: what to ask it and the size it decodes. Only 8-bit grey and RGB scale (not CMYK, nor 16-bit).
fn jpeg_scaled(bytes: &[u8], full: (u32, u32), covers: (u32, u32)) -> Option<((u16, u16), (u32, u32))> {
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    decoder.read_info().ok()?;
    if !matches!(decoder.info()?.pixel_format, PixelFormat::L8 | PixelFormat::RGB24) {
        return None;
    }
    let (w, h) = (u16::try_from(covers.0).ok()?, u16::try_from(covers.1).ok()?);
    // The decoder takes the smallest scale that covers either side; asking per side and keeping the larger
    // covers both.
    let mut asked = (w, u16::MAX);
    if decoder.scale(asked.0, asked.1).ok()?.1 < h {
        asked = (u16::MAX, h);
    }
    let size = decoder.scale(asked.0, asked.1).ok()?;
    let size = (u32::from(size.0), u32::from(size.1));
    (size.0 < full.0).then_some((asked, size))
}

/// Decodes an image file as `plan` says, under the limits of `max_pixels`, with its EXIF orientation applied.
pub fn decode(bytes: &[u8], plan: &Plan, max_pixels: u64) -> Result<RgbImage, Unfit> {
    let corrupt = |e: &dyn std::fmt::Display| Unfit::Unreadable(format!("corrupt image: {e}"));
    let (mut decoder, mut limits) = decoder(bytes, max_pixels, plan.jpeg_scaled.is_none())?;
    let orientation = decoder.orientation().map_err(|e| Unfit::Unreadable(format!("unreadable image: {e}")))?;
    let mut image = match plan.jpeg_scaled {
        Some((w, h)) => {
            let mut jpeg = jpeg_decoder::Decoder::new(bytes);
            jpeg.set_max_decoding_buffer_size(usize::try_from(max_pixels.saturating_mul(3)).unwrap_or(usize::MAX));
            let (width, height) = jpeg.scale(w, h).map_err(|e| corrupt(&e))?;
            let pixels = jpeg.decode().map_err(|e| corrupt(&e))?;
            let (width, height) = (u32::from(width), u32::from(height));
            let image = match jpeg.info().map(|i| i.pixel_format) {
                Some(PixelFormat::L8) => image::GrayImage::from_raw(width, height, pixels).map(DynamicImage::from),
                _ => RgbImage::from_raw(width, height, pixels).map(DynamicImage::from),
            };
            image.ok_or_else(|| corrupt(&"fewer pixels than its size"))?
        }
        None => {
            limits.reserve(decoder.total_bytes()).map_err(|e| corrupt(&e))?;
            DynamicImage::from_decoder(decoder).map_err(|e| corrupt(&e))?
        }
    };
    image.apply_orientation(orientation);
    Ok(image.into_rgb8())
}

/// An image as the VAE takes it: RGB, channels first, in [-1, 1].
#[derive(Debug, Clone)]
pub struct Pixels {
    /// [3, height, width], row-major.
    pub data: Vec<f32>,
    pub width: u32,
    pub height: u32,
}

/// Resizes (Lanczos, like PIL's LANCZOS that diffusers' scripts use) and crops `image` into its bucket as `fit`
/// says.
pub fn prepare(image: &RgbImage, fit: &Fit) -> Pixels {
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
    Pixels { data, width, height }
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
        let small = s.fit(255, 4000).unwrap_err().to_string();
        assert!(small.contains("255x4000 px, the shorter side is under the minimum of 256"), "{small}");
        assert!(s.fit(256, 256).is_ok());
        let panorama = s.fit(200_000, 300).unwrap_err().to_string();
        assert!(panorama.contains("so elongated"), "{panorama}");
        // The advice takes in the smallest: a quarter of the resolution suggested, or the side itself.
        let advice = s.too_small_advice(&[200, 192, 250]).unwrap();
        assert!(advice.starts_with("3 image(s) have a shorter side under the minimum of 256 px"), "{advice}");
        assert!(advice.contains("pass --resolution 768 or --min-side 192"), "{advice}");
        assert!(
            BucketSpec::new(1024, None, Some(300))
                .unwrap()
                .too_small_advice(&[97])
                .unwrap()
                .contains("pass --min-side 97")
        );
        assert_eq!(s.too_small_advice(&[]), None);
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
        let p = prepare(&image, &s.fit(700, 300).unwrap());
        assert_eq!((p.width, p.height, p.data.len()), (384, 160, 3 * 384 * 160));
        let at = |c: usize, y: usize, x: usize| p.data[(c * 160 + y) * 384 + x];
        assert_eq!((at(0, 0, 0), at(1, 70, 192), at(2, 159, 383)), (-1.0, 1.0, -1.0));
        assert!(p.data.iter().all(|v| (-1.0..=1.0).contains(v)));
    }

    /// Plans and decodes `bytes` at 64² with 16 px steps and no minimum side.
    fn decode_64(bytes: &[u8]) -> Result<RgbImage, Unfit> {
        decode(
            bytes,
            &plan(bytes, &BucketSpec::new(64, Some(16), Some(1)).unwrap(), DEFAULT_MAX_PIXELS)?,
            DEFAULT_MAX_PIXELS,
        )
    }

    #[test]
    fn decode_applies_exif_orientation() {
        // A 64x32 JPEG tagged "rotate 90° clockwise" is seen as 32x64.
        let mut jpeg = Vec::new();
        let image = RgbImage::from_pixel(64, 32, [200, 10, 10].into());
        image::codecs::jpeg::JpegEncoder::new(&mut jpeg).encode_image(&image).unwrap();
        assert_eq!(decode_64(&jpeg).unwrap().dimensions(), (64, 32));
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
        assert_eq!(decode_64(&rotated).unwrap().dimensions(), (32, 64));
        let spec = BucketSpec::new(64, Some(16), Some(1)).unwrap();
        assert_eq!(plan(&rotated, &spec, DEFAULT_MAX_PIXELS).unwrap().fit.bucket, (32, 64), "buckets see it upright");
        assert!(decode_64(&rotated[..rotated.len() / 2]).unwrap_err().to_string().contains("image"));
        assert!(decode_64(b"not an image").unwrap_err().to_string().starts_with("unreadable image"));
    }

    /// The committed bomb: 69 bytes declaring 100000x100000 RGB. Refused from its header, naming its size,
    /// under any limit short of its 10¹⁰ pixels.
    #[test]
    fn a_decompression_bomb_is_refused_before_decoding() {
        let bomb = include_bytes!("../../../tests/fixtures/images/bomb-100000x100000.png");
        let refused = plan(bomb, &BucketSpec::new(1024, None, None).unwrap(), DEFAULT_MAX_PIXELS).unwrap_err();
        assert_eq!(
            refused,
            Unfit::TooLarge { width: 100_000, height: 100_000, decoded: (100_000, 100_000), max_pixels: 8192 * 8192 }
        );
        let message = refused.to_string();
        assert!(message.contains("100000x100000 px is 10000000000 pixels, over the limit of 67108864"), "{message}");
        // With the limit above it, the limits of the decoder still stop it: an error, not an abort.
        let spec = BucketSpec::new(1024, None, None).unwrap();
        let unlimited = plan(bomb, &spec, u64::MAX / 16).unwrap();
        assert!(decode(bomb, &unlimited, 1 << 20).is_err());
    }

    /// A JPEG much larger than its bucket is decoded at the smallest DCT scale that covers the resize, and the
    /// limit counts the pixels decoded; a PNG, which cannot scale, counts whole.
    #[test]
    fn large_jpegs_are_decoded_at_reduced_size() {
        let image = RgbImage::from_fn(1024, 768, |x, y| [(x / 4) as u8, (y / 4) as u8, 90].into());
        let (mut jpeg, mut png) = (Vec::new(), Vec::new());
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90).encode_image(&image).unwrap();
        image.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        let spec = BucketSpec::new(128, Some(16), None).unwrap();
        // 1024x768 at 128: bucket 144x96, resized to 144x108; 1/8 would give 128x96, so 1/4: 256x192.
        let p = plan(&jpeg, &spec, DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!((p.fit.bucket, p.fit.resized), ((144, 96), (144, 108)));
        let decoded = decode(&jpeg, &p, DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!(decoded.dimensions(), (256, 192));
        let pixels = prepare(&decoded, &p.fit);
        assert_eq!((pixels.width, pixels.height), (144, 96));
        // The reduced decode is the image: the centre pixel keeps its colour within JPEG's error.
        let full = decode(&jpeg, &Plan { jpeg_scaled: None, ..p }, DEFAULT_MAX_PIXELS).unwrap();
        let (a, b) = (decoded.get_pixel(128, 96).0, full.get_pixel(512, 384).0);
        assert!(a.iter().zip(b).all(|(x, y)| x.abs_diff(y) < 24), "{a:?} vs {b:?}");

        let limit = 256 * 192;
        assert!(plan(&jpeg, &spec, limit).is_ok());
        let over = plan(&jpeg, &spec, limit - 1).unwrap_err().to_string();
        assert!(over.contains("1024x768 px, decoded at reduced size as 256x192 px, is 49152 pixels"), "{over}");
        let png_over = plan(&png, &spec, limit).unwrap_err().to_string();
        assert!(png_over.contains("1024x768 px is 786432 pixels, over the limit of 49152"), "{png_over}");
    }
}
