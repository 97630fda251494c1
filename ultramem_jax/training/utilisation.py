"""How well a run uses its chips: model TFLOP/s per device and model FLOPs
utilisation (MFU), from the tokens per second the loop measures.

    TFLOP/s per device = train FLOPs per token * tokens/s / devices / 1e12
    MFU = TFLOP/s per device / the device's peak TFLOP/s

Train FLOPs per token are ``model/flops.py``'s (3x the forward). The peak
is ``train.peak_tflops`` when set, else the dense bfloat16 peak of the chip
named by ``jax.devices()[0].device_kind`` from :data:`PEAK_BF16_TFLOPS`
(the vendors' data sheets; MFU is quoted against bf16 whatever dtype the
run computes in), else unknown: MFU is then ``n/a`` (every CPU).
"""

from __future__ import annotations

import dataclasses

import jax

# (words that must all appear in the lower-cased device_kind, dense bf16
# peak TFLOP/s per chip, the chip), the first match wins: more specific
# names first.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float, str], ...] = (
    (("tpu", "v6"), 918.0, "TPU v6e (Trillium)"),     # device_kind 'TPU v6 lite'
    (("tpu", "v5", "lite"), 197.0, "TPU v5e"),        # 'TPU v5 lite'
    (("tpu", "v5e"), 197.0, "TPU v5e"),
    (("tpu", "v5"), 459.0, "TPU v5p"),                # 'TPU v5', 'TPU v5p'
    (("tpu", "v4"), 275.0, "TPU v4"),
    (("h200",), 989.0, "NVIDIA H200 SXM"),
    (("h100", "pcie"), 756.0, "NVIDIA H100 PCIe"),
    (("h100",), 989.0, "NVIDIA H100 SXM"),            # 'NVIDIA H100 80GB HBM3'
    (("a100",), 312.0, "NVIDIA A100"),
)


def known_peak(device_kind: str) -> tuple[float, str] | None:
  """(dense bf16 peak TFLOP/s, chip) of a ``device_kind``, or None."""
  kind = device_kind.lower()
  for words, peak, chip in PEAK_BF16_TFLOPS:
    if all(w in kind for w in words):
      return peak, chip
  return None


@dataclasses.dataclass(frozen=True)
class Utilisation:
  """Turns tokens/s into TFLOP/s per device and MFU for one run."""
  train_flops_per_token: int
  devices: int
  peak_tflops: float | None        # per device; None: unknown
  peak_source: str                 # where the peak came from, for the log

  @classmethod
  def for_run(cls, train_flops_per_token: int,
              configured_peak: float = 0.0) -> "Utilisation":
    """The peak from ``train.peak_tflops`` (> 0), else the device table."""
    kind = jax.devices()[0].device_kind
    if configured_peak > 0:
      peak, source = configured_peak, "train.peak_tflops"
    elif (known := known_peak(kind)) is not None:
      peak, source = known[0], f"{known[1]} dense bf16 peak"
    else:
      peak, source = None, f"unknown for device kind {kind!r}"
    return cls(train_flops_per_token, jax.device_count(), peak, source)

  def tflops_per_device(self, tokens_per_sec: float) -> float:
    return self.train_flops_per_token * tokens_per_sec / self.devices / 1e12

  def mfu(self, tokens_per_sec: float) -> float | None:
    """The fraction of the peak (0.5 = 50%), or None when it is unknown."""
    if self.peak_tflops is None:
      return None
    return self.tflops_per_device(tokens_per_sec) / self.peak_tflops

  def describe(self) -> str:
    peak = ("n/a" if self.peak_tflops is None
            else f"{self.peak_tflops:g} TFLOP/s per device")
    return (f"utilisation: {self.train_flops_per_token:,} train FLOPs per "
            f"token over {self.devices} device(s); peak {peak} ({self.peak_source})")
