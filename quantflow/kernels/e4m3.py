"""The FP8 format the FP8 kernels and runtime share: e4m3 (``torch.float8_e4m3fn``) and its largest finite value.

Kept apart from both so that the kernels need nothing from the runtime that calls them.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
