//! Device names as the command line and hosts files give them (`cpu`, `cuda:N`), checked without touching a
//! GPU so that a launcher can vet the devices of machines it is not on, and opened where a rank runs.

use candle_core::{Device, DeviceLocation};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device `{0}`: use cpu or cuda:N")]
    Unknown(String),
    #[error("opening {name}: {cause}")]
    Open { name: String, cause: candle_core::Error },
}

/// The CUDA ordinal a device name asks for, `None` for the CPU; `cuda` alone is the first GPU, as in PyTorch
/// (and as `acrf plan --help` and docs/memory.md spell it).
pub fn cuda_ordinal(name: &str) -> Result<Option<usize>, DeviceError> {
    match name {
        "cpu" => Ok(None),
        "cuda" => Ok(Some(0)),
        _ => match name.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok(Some(i)),
            _ => Err(DeviceError::Unknown(name.to_string())),
        },
    }
}

/// Opens the device `name` names, a GPU set up for training (`cuda::prepare`).
pub fn open(name: &str) -> Result<Device, DeviceError> {
    let open = |i| -> candle_core::Result<Device> {
        let device = Device::new_cuda(i)?;
        #[cfg(feature = "cuda")]
        crate::cuda::prepare(&device)?;
        Ok(device)
    };
    Ok(match cuda_ordinal(name)? {
        None => Device::Cpu,
        Some(i) => open(i).map_err(|cause| DeviceError::Open { name: name.to_string(), cause })?,
    })
}

/// How `--device` names `device`.
pub fn name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_without_a_gpu() {
        assert_eq!(cuda_ordinal("cpu").unwrap(), None);
        assert_eq!(cuda_ordinal("cuda:3").unwrap(), Some(3));
        assert_eq!(cuda_ordinal("cuda").unwrap(), Some(0));
        for bad in ["gpu0", "cuda:", "cuda:x", "CPU", "cuda0"] {
            let e = cuda_ordinal(bad).unwrap_err().to_string();
            assert_eq!(e, format!("unknown device `{bad}`: use cpu or cuda:N"));
        }
        assert_eq!(name(&open("cpu").unwrap()), "cpu");
    }
}
