//! Per-layer key/value cache for incremental decoding: keys and values of earlier positions,
//! [B, K, S, Dh] per layer, in preallocated buffers that double when full (appending is a copy
//! of the new positions only, not of the whole cache).

use candle_core::Tensor;

use crate::Result;

struct Buffer {
    k: Tensor, // [B, K, capacity, Dh]
    v: Tensor,
}

pub struct KvCache {
    layers: Vec<Option<Buffer>>,
    len: usize,
    pending: usize,
    initial_capacity: usize,
}

impl KvCache {
    /// A cache for `num_layers` layers; buffers start at `initial_capacity` positions.
    pub fn new(num_layers: usize, initial_capacity: usize) -> KvCache {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
            pending: 0,
            initial_capacity: initial_capacity.max(1),
        }
    }

    /// Positions cached (identical for every layer once a forward pass is complete).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
        self.pending = 0;
    }

    /// Appends `k`, `v` [B, K, T, Dh] to layer `layer`; returns all keys and values so far,
    /// [B, K, len + T, Dh]. The cache length advances when the last layer has appended.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n_layers = self.layers.len();
        let (b, heads, t, dh) = k.dims4()?;
        let need = self.len + t;
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| crate::Error::Config(format!("layer {layer} is not in the cache")))?;
        let capacity = slot.as_ref().map(|s| s.k.dim(2)).transpose()?.unwrap_or(0);
        if need > capacity {
            let mut cap = capacity.max(self.initial_capacity);
            while cap < need {
                cap *= 2;
            }
            let zeros = || Tensor::zeros((b, heads, cap, dh), k.dtype(), k.device());
            let (nk, nv) = (zeros()?, zeros()?);
            if let Some(old) = slot.as_ref() {
                if self.len > 0 {
                    nk.slice_set(&old.k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    nv.slice_set(&old.v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
            }
            *slot = Some(Buffer { k: nk, v: nv });
        }
        let buf = slot
            .as_ref()
            .ok_or_else(|| crate::Error::Config("cache buffer missing".into()))?;
        buf.k.slice_set(&k.contiguous()?, 2, self.len)?;
        buf.v.slice_set(&v.contiguous()?, 2, self.len)?;
        let out = (buf.k.narrow(2, 0, need)?, buf.v.narrow(2, 0, need)?);
        self.pending = t;
        if layer + 1 == n_layers {
            self.len += self.pending;
            self.pending = 0;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    #[test]
    fn appends_grow_and_return_everything_so_far() {
        let dev = Device::Cpu;
        let mut c = KvCache::new(2, 2);
        let mk = |start: f32, t: usize| {
            let data: Vec<f32> = (0..t * 3).map(|i| start + i as f32).collect();
            Tensor::from_vec(data, (1, 1, t, 3), &dev).unwrap()
        };
        let mut expect: Vec<f32> = Vec::new();
        for (step, t) in [3usize, 1, 1, 4].into_iter().enumerate() {
            let k = mk(100.0 * step as f32, t);
            let v = (k.clone() * -1.0).unwrap();
            expect.extend(k.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            for layer in 0..2 {
                let (ka, va) = c.append(layer, &k, &v).unwrap();
                assert_eq!(ka.dims(), &[1, 1, expect.len() / 3, 3]);
                let got: Vec<f32> = ka.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(got, expect, "layer {layer} step {step}");
                let vneg: Vec<f32> = va
                    .i((0, 0))
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(vneg, expect.iter().map(|x| -x).collect::<Vec<_>>());
            }
            assert_eq!(
                c.len(),
                expect.len() / 3,
                "length advances after the last layer"
            );
        }
        c.reset();
        assert!(c.is_empty());
        let (ka, _) = c.append(0, &mk(7.0, 1), &mk(7.0, 1)).unwrap();
        assert_eq!(ka.dims(), &[1, 1, 1, 3]);
    }
}
