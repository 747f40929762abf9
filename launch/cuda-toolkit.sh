#!/usr/bin/env bash
# A CUDA 11.8 toolchain in DEST, for building Horovod's NCCL operations on any Debian 12 machine
# (no GPU or driver needed): nvcc from Debian's own nvidia-cuda-toolkit, headers, the static CUDA
# runtime and NVIDIA's link stub of the driver from nvidia-cuda-dev, libcudart from libcudart11.0
# (bookworm non-free, all three 11.8.89). The packages are downloaded and unpacked, not installed:
# apt runs with a private sources list (this machine's Debian mirror and suites, component
# non-free) and private state, so the machine's apt sources and packages stay as they are.
# Why not PyPI: its nvidia-cuda-nvcc-cu11 wheel has ptxas and headers but no nvcc, cicc, cudafe++
# or fatbinary, and no static runtime.
#
#   usage: cuda-toolkit.sh DEST      (idempotent; DEST/bin/nvcc works when it exits 0)
set -euo pipefail

DEST=${1:?usage: cuda-toolkit.sh DEST}
TOOLKIT_VERSION=11.8.89~11.8.0-5~deb12u1
PACKAGES=(nvidia-cuda-toolkit="$TOOLKIT_VERSION" nvidia-cuda-dev="$TOOLKIT_VERSION" libcudart11.0="$TOOLKIT_VERSION")
HOST_CXX=${CUDAHOSTCXX:-g++-11}  # nvcc 11.8 accepts GCC up to 11

log() { printf '[cuda-toolkit] %s\n' "$*" >&2; }

if [ "$(cat "$DEST/.complete" 2>/dev/null)" = "$TOOLKIT_VERSION" ]; then exit 0; fi
mkdir -p "$(dirname "$DEST")"
work=$(mktemp -d "${DEST%/}.partial.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- download with a private apt: this machine's Debian suites, component non-free ----------
. /etc/os-release
mkdir -p "$work/apt/lists/partial" "$work/apt/archives/partial" "$work/debs"
apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Created-By: Packages' 2>/dev/null \
  | awk -v c="$VERSION_CODENAME" '$2 == c || $2 == c "-updates" || $2 == c "-security"' | sort -u \
  | while read -r uri release; do
      echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $release non-free"
    done > "$work/apt/sources.list"
if [ ! -s "$work/apt/sources.list" ]; then
  echo "cuda-toolkit.sh: no Debian $VERSION_CODENAME source in this machine's apt configuration" \
       "(apt-get indextargets); the CUDA 11.8 toolchain comes from Debian's non-free component" >&2
  exit 1
fi
APT=(-q -o Dir::Etc::SourceList="$work/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o Dir::State::Lists="$work/apt/lists" -o Dir::Cache="$work/apt" -o Dir::Cache::pkgcache=
     -o Dir::Cache::srcpkgcache= -o APT::Sandbox::User=root)
log "downloading ${PACKAGES[*]} (Debian non-free, about 860 MB)"
apt-get "${APT[@]}" update >"$work/apt.log" 2>&1 || { cat "$work/apt.log" >&2; exit 1; }
(cd "$work/debs" && apt-get "${APT[@]}" download "${PACKAGES[@]}") >>"$work/apt.log" 2>&1 \
  || { cat "$work/apt.log" >&2; exit 1; }

# --- unpack what a build needs, in the layout nvcc and CMake expect --------------------------
log "unpacking"
root=$work/root
mkdir -p "$root"
for deb in "$work"/debs/*.deb; do
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$root" --wildcards \
    './usr/bin/*' './usr/lib/nvidia-cuda-toolkit/*' './usr/include/*' \
    './usr/lib/x86_64-linux-gnu/libcudart*' './usr/lib/x86_64-linux-gnu/libcudadevrt.a' \
    './usr/lib/x86_64-linux-gnu/libculibos.a' './usr/lib/x86_64-linux-gnu/stubs/libcuda.so' 2>/dev/null || true
done
rm -f "$work"/debs/*.deb
cuda=$work/cuda
mkdir -p "$cuda/bin" "$cuda/nvvm/bin" "$cuda/lib64/stubs"
cp "$root/usr/lib/nvidia-cuda-toolkit/bin/nvcc" "$cuda/bin/"
cp -r "$root/usr/lib/nvidia-cuda-toolkit/bin/crt" "$cuda/bin/"
cp "$root/usr/lib/nvidia-cuda-toolkit/bin/cicc" "$cuda/nvvm/bin/"
cp -r "$root/usr/lib/nvidia-cuda-toolkit/libdevice" "$cuda/nvvm/"
for tool in cudafe++ ptxas fatbinary nvlink bin2c nvprune; do cp "$root/usr/bin/$tool" "$cuda/bin/"; done
cp -r "$root/usr/include" "$cuda/include"
cp -P "$root"/usr/lib/x86_64-linux-gnu/libcudart* "$root"/usr/lib/x86_64-linux-gnu/libcudadevrt.a \
      "$root"/usr/lib/x86_64-linux-gnu/libculibos.a "$cuda/lib64/"
# NVIDIA's link stub of the driver: on a machine without a driver, install.sh lets `import mxnet`
# (Horovod's CMake runs it) load with it
cp "$root/usr/lib/x86_64-linux-gnu/stubs/libcuda.so" "$cuda/lib64/stubs/"
cat > "$cuda/bin/nvcc.profile" <<'EOF'
TOP              = $(_HERE_)/..
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
PATH            += $(TOP)/nvvm/bin:$(_HERE_):
INCLUDES        +=  "-I$(TOP)/include" $(_SPACE_)
LIBRARIES        =+ $(_SPACE_) "-L$(TOP)/lib64/stubs" "-L$(TOP)/lib64"
EOF

# --- prove it compiles and links a kernel before calling it done --------------------------------
cat > "$work/probe.cu" <<'EOF'
#include <cuda_fp16.h>
__global__ void scale(__half* x, float s) { x[threadIdx.x] = __float2half(__half2float(x[threadIdx.x]) * s); }
int main() { __half* x = nullptr; scale<<<1, 32>>>(x, 2.0f); return cudaDeviceSynchronize() == cudaSuccess ? 0 : 1; }
EOF
"$cuda/bin/nvcc" -ccbin "$HOST_CXX" -gencode arch=compute_70,code=sm_70 -o "$work/probe" "$work/probe.cu" \
  || { echo "cuda-toolkit.sh: the unpacked nvcc cannot build a kernel with $HOST_CXX" >&2; exit 1; }
echo "$TOOLKIT_VERSION" > "$cuda/.complete"
rm -rf "$DEST"
mv "$cuda" "$DEST"
log "ready: $DEST ($("$DEST/bin/nvcc" --version | tail -1))"
