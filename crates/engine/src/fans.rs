//! Fan-in and fan-out of a shape under a layout convention, with explicit overrides.

/// Where a framework keeps the input and output dimensions of a weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Layout {
    /// `[out, in, *kernel]`, as torch.nn.Linear and ConvNd weights.
    #[default]
    Torch,
    /// `[*kernel, in, out]`, as Keras and JAX kernels.
    Keras,
}

/// Fans as far as they are known: under TORCH a tensor of rank < 2 has none unless given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Fans {
    pub fan_in: Option<u64>,
    pub fan_out: Option<u64>,
}

/// The product of the receptive field overflowed u64.
#[derive(Debug, PartialEq, Eq)]
pub struct FanOverflow;

impl Fans {
    /// Computes the fans of `shape` under `layout`; an explicit value replaces a computed one.
    pub fn new(
        shape: &[u64],
        layout: Layout,
        fan_in: Option<u64>,
        fan_out: Option<u64>,
    ) -> Result<Self, FanOverflow> {
        let computed = match layout {
            Layout::Torch => torch_fans(shape)?,
            Layout::Keras => keras_fans(shape)?,
        };
        Ok(Self {
            fan_in: fan_in.or(computed.fan_in),
            fan_out: fan_out.or(computed.fan_out),
        })
    }
}

fn product(dims: &[u64]) -> Result<u64, FanOverflow> {
    dims.iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or(FanOverflow)
}

fn both(fan_in: u64, fan_out: u64) -> Fans {
    Fans {
        fan_in: Some(fan_in),
        fan_out: Some(fan_out),
    }
}

fn torch_fans(shape: &[u64]) -> Result<Fans, FanOverflow> {
    if shape.len() < 2 {
        return Ok(Fans::default());
    }
    let receptive = product(&shape[2..])?;
    let scaled = |d: u64| d.checked_mul(receptive).ok_or(FanOverflow);
    Ok(both(scaled(shape[1])?, scaled(shape[0])?))
}

fn keras_fans(shape: &[u64]) -> Result<Fans, FanOverflow> {
    match shape {
        [] => Ok(both(1, 1)),
        [n] => Ok(both(*n, *n)),
        [kernel @ .., fan_in, fan_out] => {
            let receptive = product(kernel)?;
            let scaled = |d: u64| d.checked_mul(receptive).ok_or(FanOverflow);
            Ok(both(scaled(*fan_in)?, scaled(*fan_out)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_layout() {
        assert_eq!(
            Fans::new(&[256, 784], Layout::Torch, None, None),
            Ok(both(784, 256))
        );
        assert_eq!(
            Fans::new(&[64, 3, 7, 7], Layout::Torch, None, None),
            Ok(both(147, 3136))
        );
        assert_eq!(
            Fans::new(&[10], Layout::Torch, None, None),
            Ok(Fans::default())
        );
        let bias = Fans::new(&[10], Layout::Torch, Some(256), None).unwrap();
        assert_eq!((bias.fan_in, bias.fan_out), (Some(256), None));
    }

    #[test]
    fn keras_layout() {
        assert_eq!(Fans::new(&[], Layout::Keras, None, None), Ok(both(1, 1)));
        assert_eq!(
            Fans::new(&[33], Layout::Keras, None, None),
            Ok(both(33, 33))
        );
        assert_eq!(
            Fans::new(&[3, 3, 32, 64], Layout::Keras, None, None),
            Ok(both(288, 576))
        );
        assert_eq!(
            Fans::new(&[784, 128], Layout::Keras, Some(5), Some(6)),
            Ok(both(5, 6))
        );
    }

    #[test]
    fn overflow_is_reported() {
        let huge = [0, u64::MAX, 2, 2];
        assert_eq!(
            Fans::new(&huge, Layout::Torch, None, None),
            Err(FanOverflow)
        );
    }
}
