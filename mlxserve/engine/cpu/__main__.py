"""Build the quantized CPU kernels now (``make install`` does; the first model load would)."""

from __future__ import annotations

import sys

from . import buildext


def main() -> int:
    path, why = buildext.build()
    if path is None:
        print(f"note: quantized CPU kernels not built ({why}); the CPU path dequantizes to float32")
        return 0
    print(f"quantized CPU kernels: {why} ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
