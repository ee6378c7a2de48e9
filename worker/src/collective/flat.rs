//! The one flat buffer a step all-reduces: every gradient and the step's statistics, summed in one
//! collective call so that a step pays one round of latency rather than one per tensor. Every piece has a
//! name, and the layout that packed a buffer is the one that unpacks it, so what goes in and what is read
//! back cannot drift apart.

use candle_core::{DType, Result, Shape, Tensor, bail};

/// The names and shapes of the pieces of a packed buffer, in order.
#[derive(Debug, Clone)]
pub struct Layout {
    pieces: Vec<(String, Shape)>,
}

/// Flattens `pieces` into one vector of `dtype` (each piece converted once), and the layout that unpacks it.
pub fn pack(pieces: &[(String, Tensor)], dtype: DType) -> Result<(Tensor, Layout)> {
    let flat = pieces.iter().map(|(_, t)| t.to_dtype(dtype)?.flatten_all()).collect::<Result<Vec<_>>>()?;
    let layout = Layout { pieces: pieces.iter().map(|(name, t)| (name.clone(), t.shape().clone())).collect() };
    Ok((Tensor::cat(&flat, 0)?, layout))
}

impl Layout {
    /// Cuts `flat` (a buffer of this layout, e.g. after the all-reduce) back into its named pieces, each in its
    /// shape and still in the buffer's dtype.
    pub fn unpack(&self, flat: &Tensor) -> Result<Unpacked> {
        let total: usize = self.pieces.iter().map(|(_, s)| s.elem_count()).sum();
        if flat.dims() != [total] {
            bail!("a flat buffer of shape {:?} for a layout of {total} elements", flat.dims());
        }
        let mut offset = 0;
        let mut pieces = Vec::with_capacity(self.pieces.len());
        for (name, shape) in &self.pieces {
            let n = shape.elem_count();
            pieces.push((name.clone(), flat.narrow(0, offset, n)?.reshape(shape)?));
            offset += n;
        }
        Ok(Unpacked { pieces })
    }
}

/// The pieces of an unpacked buffer, by name.
pub struct Unpacked {
    pieces: Vec<(String, Tensor)>,
}

impl Unpacked {
    /// Takes the piece `name` out.
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        match self.pieces.iter().position(|(n, _)| n == name) {
            Some(i) => Ok(self.pieces.swap_remove(i).1),
            None => bail!("no piece `{name}` in the flat buffer"),
        }
    }

    /// Takes the piece `name` out as host values.
    pub fn values(&mut self, name: &str) -> Result<Vec<f64>> {
        self.take(name)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn pieces_come_back_by_name_in_their_shapes() -> Result<()> {
        let a = Tensor::arange(0f32, 6.0, &Device::Cpu)?.reshape((2, 3))?;
        let b = Tensor::new(&[0.1f64, 1e-30], &Device::Cpu)?;
        let (flat, layout) = pack(&[("a".into(), a.clone()), ("b".into(), b.clone())], DType::F64)?;
        assert_eq!((flat.dims(), flat.dtype()), (&[8][..], DType::F64));
        let mut out = layout.unpack(&flat)?;
        assert_eq!(out.values("b")?, [0.1, 1e-30]);
        let a2 = out.take("a")?;
        assert_eq!((a2.dims(), a2.to_dtype(DType::F32)?.to_vec2::<f32>()?), (&[2, 3][..], a.to_vec2::<f32>()?));
        assert!(out.take("a").is_err(), "a piece is taken once");
        assert!(layout.unpack(&flat.narrow(0, 0, 7)?).is_err(), "a buffer of another length");
        Ok(())
    }
}
