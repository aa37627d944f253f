#!/bin/sh
# Builds `florence` with CUDA support on a machine without a GPU or a CUDA toolkit: NVIDIA's
# PyPI wheels provide nvcc, the headers and the libraries, in a local folder.
#
#   CUDA_COMPUTE_CAP=90 sh tools/cuda/build.sh        # 90: H100/H200; 89: L4/4090; 86: 3090/A10; 80: A100
#
# The toolkit is CUDA 13.0 (override with CUDA_VERSION=13.x): a driver refuses PTX from a toolkit
# newer than itself, so keep this at or below the driver's CUDA version (`nvidia-smi`).
# The binary is target/release/florence (and the tensor path's generation test, whose path is
# printed, for tools/cuda/check.sh); at run time it loads libcudart, libcublas, libcurand and
# libnvrtc from LD_LIBRARY_PATH (this script prints the value to use) and libcuda from the driver.
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
ENV=${FLORENCE_CUDA_DIR:-$ROOT/.cuda}
VERSION=${CUDA_VERSION:-13.0}
: "${CUDA_COMPUTE_CAP:?set CUDA_COMPUTE_CAP, e.g. 90 for an H100}"

if [ ! -x "$ENV/bin/python" ]; then
  python3 -m venv "$ENV"
fi
"$ENV/bin/pip" install -q "nvidia-cuda-nvcc==$VERSION.*" "nvidia-cuda-runtime==$VERSION.*" \
  "nvidia-cuda-crt==$VERSION.*" "nvidia-nvvm==$VERSION.*" "nvidia-cuda-nvrtc==$VERSION.*" \
  "nvidia-cuda-cccl==$VERSION.*" "nvidia-cublas==$VERSION.*" "nvidia-curand"
CUDA=$("$ENV/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')

# The wheels ship versioned libraries only, and no libcuda (the driver's): give the linker the
# unversioned names, and a stub libcuda made from the driver API names cudarc declares.
mkdir -p "$ENV/link"
for lib in cudart cublas cublasLt curand nvrtc; do
  real=$(ls "$CUDA/lib/lib$lib.so."* | grep -v builtins | grep -v alt | head -n 1)
  ln -sf "$real" "$ENV/link/lib$lib.so"
done
(cd "$ROOT" && cargo fetch -q)
"$ENV/bin/python" "$ROOT/tools/cuda/libcuda_stub.py" "$ENV/link"

export CUDA_ROOT="$CUDA" CUDA_PATH="$CUDA" CUDA_COMPUTE_CAP
export PATH="$CUDA/bin:$PATH"
export LIBRARY_PATH="$ENV/link${LIBRARY_PATH:+:$LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L $ENV/link"
cd "$ROOT"
cargo build --release -p florence-cli --features cuda
echo "built ${CARGO_TARGET_DIR:-$ROOT/target}/release/florence with CUDA (compute capability $CUDA_COMPUTE_CAP)"
# The tensor path's generation test, to run on the GPU (tools/cuda/check.sh): its path is printed.
cargo test --release -p florence --features cuda --test tensor_generation --no-run 2>&1 \
  | sed -n 's/.*Executable .*(\(.*\)).*/built the GPU test \1/p'
echo "run it with LD_LIBRARY_PATH=$CUDA/lib"
