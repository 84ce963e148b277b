"""The 7B block-checkpointing run with the dequantization behind the old opaque custom op (benchmarks/nf4_launch.py's)."""
import sys

sys.path.insert(0, "benchmarks")
import lorabench.kernels.nf4 as nf4  # noqa: E402
from nf4_launch import custom_op_dequantize  # noqa: E402

nf4._DEQUANTIZE = custom_op_dequantize()
from lorabench.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
