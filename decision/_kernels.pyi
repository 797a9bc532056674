"""Types of the C extension decision._kernels (decision/_kernels.c): C-contiguous float64 arrays."""

import numpy as np
from numpy.typing import NDArray

_F = NDArray[np.float64]

def estimate(numbers: _F, tel: _F, rtt: _F, egress: _F | None, inflight: _F | None, ncols: int, run_col: int,
             wait_col: int, kv_col: int, in_tok: float, out_tok: float, unknown_load: float, egress_factor: float,
             out: _F, /) -> None: ...
def route_features(static: _F, tel: _F, ttft: _F, queue: _F, cost: _F, rtt: _F, ages: _F, same_region: _F, out: _F,
                   ncols: int, kv_col: int, util_col: int, fb_used_col: int, fb_free_col: int, power_col: int,
                   temp_col: int, session: int, modality: int, site_buckets: int, target: float, budget: float,
                   size_in: float, size_out: float, stale_after_s: float, /) -> None: ...
def mask_stale(values: _F, stamps: _F, at: float, stale_after_s: float, max_age: _F, /) -> None: ...
def telemetry_block(values: _F, stamps: _F, ncols: int, at: float, value_cols: NDArray[np.intp],
                    age_cols: NDArray[np.intp], /) -> bytes: ...
def row_keys(ids: NDArray[np.int64], block: bytes, width: int, /) -> list[bytes]: ...
