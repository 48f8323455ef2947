"""What this machine's CPU can run, for tests of paths that only some CPUs take."""

from __future__ import annotations

import pytest
import torch

from wsd_llms.packed_linear import can_pack

BFLOAT16_PACKS = can_pack(torch.empty(1, 1, dtype=torch.bfloat16))

needs_bfloat16_kernels = pytest.mark.skipif(
    not BFLOAT16_PACKS,
    reason="this CPU has no oneDNN bfloat16 kernels (AVX512-BW/VL/DQ or AVX-NE-CONVERT): bfloat16 layers and the greedy screen stay off",
)
