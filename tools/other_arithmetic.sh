#!/usr/bin/env bash
# The test suite under float32 rounding other than this machine's: a stand-in for another CPU (an Intel Xeon
# where the suite last ran on an AMD EPYC, or the reverse). Three switches change which kernels compute:
#   ATEN_CPU_CAPABILITY=default   torch's own kernels without SIMD (sums, convolutions, elementwise ops)
#   MKL_CBWR=COMPATIBLE           MKL's portable matrix-multiply path instead of the one tuned for this CPU
#   ONEDNN_MAX_CPU_ISA=AVX2       oneDNN's convolutions limited to AVX2
# Together they change the low bits of results (measured: a 257x391 @ 391x263 product, a 100k-term sum, a 3x3
# convolution), as a different CPU's kernels do. The tests' tolerances follow float32 error bounds, so the
# suite must still pass. torch.compile gets a fresh cache: its shared one holds kernels built for the default switches.
# The run is slower than the CI suite (18-20 min instead of 12-13 on 2 cores of an AMD EPYC). Extra pytest
# arguments pass through:
#   bash tools/other_arithmetic.sh [-x tests/test_terramind.py ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CACHE=$(mktemp -d)
trap 'rm -rf "$CACHE"' EXIT
export ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=AVX2 TORCHINDUCTOR_CACHE_DIR=$CACHE
$PY -c "import torch; print('torch', torch.__version__, 'kernels:', torch.backends.cpu.get_cpu_capability())"
$PY -m pytest "$@"
